"""The tool-schema rules, one hostile schema at a time, and the event-loop lag measurement (no broker)."""

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from contracts import InferenceRequest
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from tests import hostile_schemas, samples
from worker.ops.loop_lag import watch_loop_lag
from worker.ops.metrics import loop_lag_histogram
from worker.prompting import tool_schemas
from worker.prompting.prompts import runbook_tools
from worker.prompting.results import TaskFailure
from worker.prompting.tool_schemas import SchemaLimits, ToolSchemaError, argument_error, check_parameters

HOSTILE = hostile_schemas.hostile("http://127.0.0.1:9/schema.json", "file:///etc/passwd")
TREE: dict[str, Any] = {
    "type": "object",
    "properties": {"root": {"$ref": "#/$defs/node"}},
    "$defs": {
        "node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
    },
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_schema_breaks_its_rule(name: str) -> None:
    schema, rule = HOSTILE[name]
    with pytest.raises(ToolSchemaError) as raised:
        check_parameters(schema)
    assert raised.value.rule == rule
    assert "root:" not in str(raised.value)


def test_the_default_tools_keep_every_rule() -> None:
    for tool in DEFAULT_RUNBOOK_TOOLS:
        check_parameters(tool.parameters)


def test_recursion_that_descends_into_the_instance_is_allowed_and_validates() -> None:
    check_parameters(TREE)
    assert argument_error(TREE, {"root": {"children": [{"children": []}]}}) is None
    assert argument_error(TREE, {"root": {"children": [{"children": 3}]}}) == (
        "at root/children/0/children: 3 is not of type 'array'"
    )


def test_patterns_run_on_re2_in_linear_time() -> None:
    schema = hostile_schemas.catastrophic_pattern()
    check_parameters(schema)
    # Python's `re` would take longer than the age of the universe on this input.
    problem = argument_error(schema, {"s": "a" * 100_000 + "!"})
    assert problem is not None
    assert "does not match '^(a+)+$'" in problem
    assert argument_error(schema, {"s": "aaaa"}) is None


def test_property_names_are_matched_by_re2_for_additional_properties_too() -> None:
    schema = {"type": "object", "patternProperties": {"^(a+)+$": {"type": "integer"}}, "additionalProperties": False}
    check_parameters(schema)
    assert argument_error(schema, {"aaa": 1}) is None
    problem = argument_error(schema, {"a" * 100_000 + "!": 1})
    assert problem is not None
    assert "additional properties are not allowed" in problem


def test_a_pattern_only_re2_accepts_is_fine() -> None:
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": r"^\pL+\z"}}}
    check_parameters(schema)
    assert argument_error(schema, {"id": "abc"}) is None
    assert argument_error(schema, {"id": "ab1"}) is not None


def test_unevaluated_properties_with_pattern_properties_is_refused() -> None:
    # jsonschema evaluates that combination with Python's backtracking `re`.
    schema = {"type": "object", "patternProperties": {"^x": {}}, "unevaluatedProperties": False}
    with pytest.raises(ToolSchemaError) as raised:
        check_parameters(schema)
    assert raised.value.rule == "pattern_unsupported"


def test_validation_stops_at_the_time_budget() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    check_parameters(schema)
    started = time.monotonic()
    with pytest.raises(ToolSchemaError) as raised:
        argument_error(schema, {"x": [{"n": n} for n in range(50_000)]}, SchemaLimits(budget_s=0.05))
    assert raised.value.rule == "time_budget"
    assert time.monotonic() - started < 1.0


def test_a_fan_out_under_the_limit_is_allowed() -> None:
    check_parameters(hostile_schemas.exponential_chain(levels=4, fan=4))  # 340 expansions
    with pytest.raises(ToolSchemaError):
        check_parameters(hostile_schemas.exponential_chain(levels=4, fan=4), SchemaLimits(max_ref_expansions=100))


async def test_a_blocked_loop_shows_in_the_lag_histogram() -> None:
    registry = CollectorRegistry()
    lag = loop_lag_histogram(registry)
    watcher = asyncio.create_task(watch_loop_lag(lag, 0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # what a blocking call on the loop does
    await asyncio.sleep(0.05)
    watcher.cancel()
    name = "atlas_worker_event_loop_lag_seconds"
    assert (registry.get_sample_value(f"{name}_count") or 0) >= 2
    over = (registry.get_sample_value(f"{name}_count") or 0) - (
        registry.get_sample_value(f"{name}_bucket", {"le": "0.25"}) or 0
    )
    assert over == 1, "the 0.3 s block was not seen as one sample over 0.25 s"


def test_one_budget_covers_all_of_a_requests_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    request = InferenceRequest.model_validate(
        samples.request("acme", "runbook", tools=[{"name": f"t{n}", "parameters": TREE} for n in range(3)])
    )
    monkeypatch.setattr(tool_schemas, "DEFAULT_LIMITS", SchemaLimits(budget_s=0.0))
    with pytest.raises(TaskFailure) as raised:
        runbook_tools(request)
    assert (raised.value.code, raised.value.rejected) == ("invalid_tools", True)
    assert "parameters of tool 't0' break rule time_budget" in raised.value.message

"""Property tests on the broker: hostile input never kills the worker; sovereign tenants never reach Atlas Cloud."""

import asyncio
import random
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import Header, Topology
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from tests import hostile_schemas, samples
from tests.broker import broker_client, collect, delete_namespace, drain_now, json_body
from tests.conftest import start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.scene import Settlements
from worker.broker.limits import MAX_BODY_BYTES
from worker.providers.breaker import BreakerPolicy

pytestmark = pytest.mark.broker

PROPERTY_SETTINGS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

json_scalar = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=30)
)
header_value = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.sampled_from([2**63 - 1, -(2**63)])  # the edges of AMQP's int64
    # Up to four of these come near the 128 KiB frame: the worker's copies must still fit in one.
    | st.integers(20_000, 30_000).map(lambda size: "h" * size)
    | st.text(max_size=40)
    | st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1))
    | st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-1000, max_value=1000)
    | st.lists(st.integers(0, 9), max_size=3)
    | st.dictionaries(st.text("abc", max_size=5), st.integers(-1000, 1000), max_size=3)
)
odd_headers = st.dictionaries(
    st.sampled_from(
        [
            Header.ATTEMPTS,
            Header.DEFERRALS,
            Header.FIRST_FAILURE_AT,
            Header.ORIGINAL_EXCHANGE,
            Header.DEAD_LETTER_ID,
            "x-death",
            "x-custom",
            "tenant",
        ]
    ),
    header_value,
    max_size=4,
)


def _nested(depth: int) -> bytes:
    # Built as text: deeper than JSON encoders (and most parsers) will go.
    return b'{"k":' * depth + b'"leaf"' + b"}" * depth


CORRUPTIONS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": st.none() | st.integers(-(2**53), 2**53) | st.just("") | st.just("r" * 500),
    "tenant_id": st.none()
    | st.integers(-(2**53), 2**53)
    | st.sampled_from(["", "has.dot", "-lead", "x" * 100, "spa ce"]),
    "task": st.text(max_size=20).filter(lambda t: t not in {"rca", "runbook", "summary", "chat", "test_connection"}),
    "incident": json_scalar | st.just({"severity": "sev1"}) | st.just({"title": "t" * 2000, "severity": "s"}),
    "deadline": st.sampled_from(["tomorrow", "2026-13-40T00:00:00Z", "2030-01-01T00:00:00", True]),
    "max_output_tokens": st.sampled_from([0, -1, "many", 10**9]),
    "tools": json_scalar.filter(lambda v: v is not None) | st.just([{"name": "bad name!"}]),
    "messages": st.just("not a list"),
}


# Patterns RE2 refuses: lookaround, backreferences, atomic groups.
NON_RE2_PATTERNS = ["^(?=a)a$", "(?<!b)a", r"^(a)\1$", "(?>a+)b", "(?!x).*"]
NON_LOCAL_REFS = ["http://127.0.0.1:9/schema.json", "file:///etc/passwd", "other.json", "#anchor", "//127.0.0.1/x"]


@st.composite
def hostile_tool_schema(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["ref", "fanout", "cycle", "deep", "size", "pattern", "pattern_key"]))
    if kind == "ref":
        return hostile_schemas.remote_ref(draw(st.sampled_from(NON_LOCAL_REFS)))
    if kind == "fanout":
        return hostile_schemas.exponential_chain(levels=draw(st.integers(5, 12)), fan=draw(st.integers(4, 8)))
    if kind == "cycle":
        return hostile_schemas.self_cycle()
    if kind == "deep":
        return hostile_schemas.deep(draw(st.integers(33, 60)))
    if kind == "size":
        return hostile_schemas.oversized(draw(st.integers(65, 400)))
    pattern = draw(st.sampled_from(NON_RE2_PATTERNS))
    if kind == "pattern":
        return {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}}
    return {"type": "object", "patternProperties": {pattern: {}}}


def hostile_tools(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Benign default tools with one hostile schema among them."""
    tools: list[dict[str, Any]] = [t.model_dump() for t in DEFAULT_RUNBOOK_TOOLS[: draw(st.integers(0, 3))]]
    hostile = {"name": "hostile", "parameters": draw(hostile_tool_schema())}
    tools.insert(draw(st.integers(0, len(tools))), hostile)
    return tools


@st.composite
def malformed_body(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "corrupt", "missing", "deep", "not_object", "hostile_tools"]))
    if kind == "hostile_tools":
        return orjson.dumps(samples.request("acme", "runbook", tools=hostile_tools(draw)))
    if kind == "bytes":
        return draw(st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{")))
    if kind == "not_object":
        return orjson.dumps(draw(st.lists(json_scalar, max_size=3) | json_scalar))
    body = samples.request("acme", draw(st.sampled_from(["summary", "rca", "runbook"])))
    if kind == "corrupt":
        field = draw(st.sampled_from(sorted(CORRUPTIONS)))
        if field == "messages":
            body["task"] = "chat"
        body[field] = draw(CORRUPTIONS[field])
    elif kind == "missing":
        del body[draw(st.sampled_from(["request_id", "tenant_id", "task"]))]
    else:
        body["incident"]["metadata"] = "NESTED"
        return orjson.dumps(body).replace(b'"NESTED"', _nested(draw(st.integers(50, 5000))))
    return orjson.dumps(body)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


@PROPERTY_SETTINGS
@given(
    malformed=st.lists(st.tuples(malformed_body(), odd_headers), min_size=50, max_size=50),
    valid_headers=st.lists(odd_headers, min_size=10, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_hostile_input_is_dead_lettered_and_valid_requests_are_still_answered(
    amqp_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    malformed: list[tuple[bytes, dict[str, Any]]],
    valid_headers: list[dict[str, Any]],
    seed: int,
) -> None:
    async def scenario() -> None:
        topology = Topology(f"test-hostile-{seed}-{random.randrange(10**6)}")
        tenants = tmp_path_factory.mktemp("tenants")
        fake = FakeOpenAI()
        await fake.start()
        write_tenant(tenants, "acme", fake.base_url)
        settlements = Settlements()
        running = await start_worker(worker_settings(amqp_url, topology, tenants), on_settled=settlements)
        try:
            async with broker_client(amqp_url, topology) as client:
                replies = await client.reply_queue()
                reconnects: list[object] = []
                assert running.app.connection is not None
                running.app.connection.reconnect_callbacks.add(lambda *args: reconnects.append(args))
                messages = [(body, headers, False) for body, headers in malformed]
                messages += [(orjson.dumps(samples.request("acme")), h, True) for h in valid_headers]
                random.Random(seed).shuffle(messages)
                for number, (body, headers, _) in enumerate(messages):
                    await client.publish_request(
                        body, reply_to=replies.name, correlation_id=f"m-{number}", headers=headers
                    )
                # One body over the size limit as well.
                await client.publish_request(
                    b"{" + b" " * (5 * 1024 * 1024) + b"}", reply_to=replies.name, correlation_id="huge"
                )

                got = {m.correlation_id: json_body(m) for m in await collect(replies, len(messages) + 1, 60)}
                for number, (_, _, is_valid) in enumerate(messages):
                    expected = "ok" if is_valid else "rejected"
                    assert got[f"m-{number}"]["status"] == expected, (messages[number][0][:200], got[f"m-{number}"])
                assert got["huge"]["error"]["code"] == "body_too_large"
                for _ in range(len(messages) + 1):
                    await settlements.final(None)  # every delivery settled: its dead letter is on the queue
                dead = await client.channel.get_queue(topology.dead)
                dead_letters = await drain_now(dead)
                assert len(dead_letters) == len(malformed) + 1
                assert {m.headers[Header.REASON] for m in dead_letters} == {"malformed"}
                # Every copy fitted its frame (no connection was lost) and none carries the oversized body whole.
                assert reconnects == []
                assert all(len(m.body) <= MAX_BODY_BYTES for m in dead_letters)
                assert not running.task.done(), "the worker died"
        finally:
            await running.stop()
            await fake.close()
            await delete_namespace(amqp_url, topology, (f"{topology.namespace}.atlas-cloud",))

    run(scenario)


FAULTS = [None, "server_error", "rate_limit", "hang", "malformed", "bad_request", "quota", "context_overflow"]
POLICIES = ["fail_closed", "queue_and_retry", "atlas_cloud"]
# Tenant-source faults applied while requests arrive: the directory unmounted, swapped for an empty one, or a
# tenant file rewritten with bytes that are not UTF-8. None of them may look like "no BYOC config".
SOURCE_FAULTS = [None, "removed", "swapped_for_empty", "bad_bytes"]
SOURCE_FAULT_S = 1.0  # how long the fault lasts, a few reload polls


async def tenant_source_fault(directory: Path, fault: str | None) -> None:
    """Break the tenant source for a while, then heal it."""
    if fault is None:
        return
    if fault == "bad_bytes":
        victim = sorted(directory.glob("*.toml"))[0]
        good = victim.read_bytes()
        victim.write_bytes(good.replace(b"tenant_id", b"tenant_\xff\xfeid"))
        await asyncio.sleep(SOURCE_FAULT_S)
        victim.write_bytes(good)
        return
    parked = directory.with_name(directory.name + "-parked")
    directory.rename(parked)
    if fault == "swapped_for_empty":
        directory.mkdir()
    await asyncio.sleep(SOURCE_FAULT_S)
    if fault == "swapped_for_empty":
        directory.rmdir()
    parked.rename(directory)


@PROPERTY_SETTINGS
@given(
    tenants=st.lists(
        st.tuples(st.sampled_from(POLICIES), st.sampled_from(FAULTS), st.booleans()), min_size=2, max_size=5
    ),
    seed=st.integers(0, 2**16),
    source_fault=st.sampled_from(SOURCE_FAULTS),
)
def test_no_request_of_a_sovereign_tenant_ever_reaches_atlas_cloud(
    amqp_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    tenants: list[tuple[str, str | None, bool]],
    seed: int,
    source_fault: str | None,
) -> None:
    async def scenario() -> None:
        topology = Topology(f"test-sovereign-{seed}-{random.randrange(10**6)}")
        directory = tmp_path_factory.mktemp("tenants")
        fakes = []
        policy_of: dict[str, str] = {"unconfigured": "none"}
        for number, (policy, fault, wrong_key) in enumerate(tenants):
            fake = FakeOpenAI()
            await fake.start()
            fake.always = Fault(fault, retry_after_s=0.1) if fault else None  # type: ignore[arg-type]
            fakes.append(fake)
            tenant_id = f"t{number}"
            policy_of[tenant_id] = policy
            write_tenant(
                directory,
                tenant_id,
                fake.base_url,
                policy=policy,
                max_attempts=3,
                timeout_s=0.5,
                api_key="env:NOT_THE_KEY" if wrong_key else "env:TEST_FAKE_OPENAI_KEY",
            )
        running = await start_worker(
            worker_settings(amqp_url, topology, directory, breaker=BreakerPolicy(min_calls=3, cooldown_s=0.5))
        )
        try:
            async with broker_client(amqp_url, topology) as client:
                cloud = await client.bind_observer(running.app.settings.atlas_cloud_exchange)
                replies = await client.reply_queue()
                ids = []
                for n in range(4):
                    if n == 2:  # half the requests arrive while the tenant source is broken
                        breaking = asyncio.create_task(tenant_source_fault(directory, source_fault))
                    for tenant_id in policy_of:
                        request_id = f"{tenant_id}-{n}"
                        ids.append(request_id)
                        await client.publish_request(
                            samples.request(tenant_id, request_id=request_id), reply_to=replies.name
                        )
                await breaking
                terminal: dict[str, str] = {}
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while len(terminal) < len(ids) and loop.time() < deadline:
                    for message in await drain_now(replies):
                        terminal.setdefault(json_body(message)["request_id"], json_body(message)["status"])
                    for message in await drain_now(cloud):
                        request_id = json_body(message)["request_id"]
                        terminal.setdefault(request_id, "rerouted")
                        tenant = message.headers[Header.REROUTED_FROM_TENANT]
                        assert policy_of[str(tenant)] in ("atlas_cloud", "none"), f"{tenant!r} left its network"
                    await asyncio.sleep(0.05)
                assert set(terminal) == set(ids), "some requests never ended"
                assert all(terminal[f"unconfigured-{n}"] == "rerouted" for n in range(4))
        finally:
            await running.stop()
            for fake in fakes:
                await fake.close()
            await delete_namespace(amqp_url, topology, (f"{topology.namespace}.atlas-cloud",))

    run(scenario)

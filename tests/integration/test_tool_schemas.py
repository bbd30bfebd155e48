"""Tool schemas from messages are inert data, and the worker's event loop stays responsive while it reads them."""

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contracts import Header, Topology
from tests import hostile_schemas, samples
from tests.broker import BrokerClient, collect, json_body
from tests.conftest import RunningWorker, start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI, chat_completion
from tests.fakes.schema_host import SchemaHost
from tests.ops.scrape import free_port, scrape

pytestmark = pytest.mark.broker

# Files opened by this process, among those a test watches; an audit hook sees every open(), whoever calls it.
WATCHED: set[str] = set()
OPENED: list[str] = []


def _record_opens(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args and str(args[0]) in WATCHED:
        OPENED.append(str(args[0]))


sys.addaudithook(_record_opens)

# A blocked loop shows as one sample of at least (block - sampling interval). Without these rules the hostile
# schemas below block the loop for seconds (a ref fetch without timeout, 2**30 ref expansions, exponential
# backtracking); with them, the worst the loop waits is a thread's GIL switch interval (5 ms) a few times over.
# 100 ms leaves room for a busy 2-core machine shared with other test runs, and is still 10x below any of the
# blocks these schemas cause without the rules.
MAX_LOOP_LAG_S = 0.1
# The budget scenario's model answer is 40,000 objects: reading and decoding that ~0.5 MB response is the
# provider's doing, on the loop and bounded by the response cap; on a loaded 2-core machine it can take just
# over 0.1 s once. What the publisher controls (the schema check) must still not stall the loop for long.
MAX_LOOP_LAG_LARGE_ANSWER_S = 0.25
LAG_INTERVAL_S = 0.01
LONG_NON_MATCH = "a" * 5000 + "!"


@pytest.fixture
async def schema_host() -> AsyncIterator[SchemaHost]:
    host = SchemaHost()
    await host.start()
    yield host
    await host.close()


@pytest.fixture
async def second_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.close()


def runbook(tenant_id: str, parameters: dict[str, Any], name: str = "act") -> dict[str, Any]:
    return samples.request(
        tenant_id, "runbook", tools=[{"name": name, "description": "an action", "parameters": parameters}]
    )


def benign_parameters(schema_url: str) -> dict[str, Any]:
    """A normal tool: a local `$defs` ref and a pattern RE2 accepts; its `$schema` URL is never fetched."""
    return {
        "$schema": schema_url,
        "type": "object",
        "properties": {"service": {"$ref": "#/$defs/service"}, "replicas": {"type": "integer", "minimum": 0}},
        "required": ["service", "replicas"],
        "additionalProperties": False,
        "$defs": {"service": {"type": "string", "pattern": r"^[a-z][a-z0-9-]{0,62}$"}},
    }


async def test_hostile_tool_schemas_are_rejected_by_rule_reach_nothing_and_never_stall_the_loop(
    amqp_url: str,
    topology: Topology,
    tenants_dir: Path,
    client: BrokerClient,
    fake_openai: FakeOpenAI,
    second_openai: FakeOpenAI,
    schema_host: SchemaHost,
    tmp_path: Path,
) -> None:
    canary = tmp_path / "secret.json"
    canary.write_text('{"type": "string", "description": "CANARY-7f3a"}')
    WATCHED.update({str(canary), "/etc/passwd"})
    hostile = hostile_schemas.hostile(f"{schema_host.url}/remote.json", canary.as_uri())
    hostile["etc_passwd"] = (hostile_schemas.remote_ref("file:///etc/passwd"), "ref_not_local")
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    write_tenant(tenants_dir, "beta", second_openai.base_url)
    # acme's model answers the catastrophic pattern with a long non-matching argument; beta's a valid call.
    fake_openai.override = chat_completion(tool_calls=[("act", {"s": LONG_NON_MATCH})])
    second_openai.override = chat_completion(tool_calls=[("act", {"service": "checkout-api", "replicas": 3})])
    port = free_port()
    settings = worker_settings(amqp_url, topology, tenants_dir, metrics_port=port, loop_lag_interval_s=LAG_INTERVAL_S)
    running: RunningWorker = await start_worker(settings)
    try:
        replies = await client.reply_queue()
        for name, (parameters, _) in hostile.items():
            await client.publish_request(runbook("acme", parameters), reply_to=replies.name, correlation_id=name)
        await client.publish_request(
            runbook("acme", hostile_schemas.catastrophic_pattern()), reply_to=replies.name, correlation_id="backtrack"
        )
        await client.publish_request(
            runbook("beta", benign_parameters(f"{schema_host.url}/meta")), reply_to=replies.name, correlation_id="ok"
        )
        got = {m.correlation_id: json_body(m) for m in await collect(replies, len(hostile) + 2, 60)}
        dead = await collect(await client.channel.get_queue(topology.dead), len(hostile), 30)
        scraped = await scrape(port)
    finally:
        await running.stop()

    for name, (_, rule) in hostile.items():
        reply = got[name]
        assert (reply["status"], reply["error"]["code"]) == ("rejected", "invalid_tools"), (name, reply)
        assert rule in reply["error"]["message"], (name, reply["error"])
        assert "CANARY" not in str(reply)
        assert "root:" not in str(reply)
    assert {m.headers[Header.REASON] for m in dead} == {"malformed"}
    assert all(b"CANARY" not in m.body and b"root:" not in m.body for m in dead)
    assert schema_host.hits == [], "a $ref or $schema URL was fetched"
    assert OPENED == [], "a file: ref was opened"
    # The catastrophic pattern ran on RE2: a plain validation failure, answered at once.
    assert got["backtrack"]["status"] == "failed"
    assert got["backtrack"]["error"]["code"] == "invalid_output"
    assert "does not match" in got["backtrack"]["error"]["message"]
    assert got["ok"]["status"] == "ok", got["ok"]
    assert got["ok"]["result"]["tool_calls"][0]["arguments"] == {"service": "checkout-api", "replicas": 3}
    taken, under = scraped.loop_lags(MAX_LOOP_LAG_S)
    assert taken > 0
    assert under == taken, f"the event loop lagged more than {MAX_LOOP_LAG_S}s:\n{scraped.text}"


async def test_arguments_are_checked_against_a_re2_pattern(
    amqp_url: str,
    topology: Topology,
    tenants_dir: Path,
    client: BrokerClient,
    fake_openai: FakeOpenAI,
    schema_host: SchemaHost,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    fake_openai.override = chat_completion(tool_calls=[("act", {"service": "Not A Service!", "replicas": 1})])
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir))
    try:
        replies = await client.reply_queue()
        await client.publish_request(
            runbook("acme", benign_parameters(f"{schema_host.url}/meta")), reply_to=replies.name
        )
        [message] = await collect(replies, 1, 30)
    finally:
        await running.stop()
    reply = json_body(message)
    assert (reply["status"], reply["error"]["code"]) == ("failed", "invalid_output")
    assert "at service" in reply["error"]["message"]
    assert "does not match" in reply["error"]["message"]
    assert schema_host.hits == []


async def test_validation_that_outruns_its_budget_is_rejected_and_the_loop_keeps_going(
    amqp_url: str, topology: Topology, tenants_dir: Path, client: BrokerClient, fake_openai: FakeOpenAI
) -> None:
    # A valid schema whose check is quadratic in the model's answer: 40,000 distinct objects under uniqueItems.
    parameters = {"type": "object", "properties": {"items": {"type": "array", "uniqueItems": True}}}
    fake_openai.override = chat_completion(tool_calls=[("act", {"items": [{"n": n} for n in range(40_000)]})])
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    port = free_port()
    settings = worker_settings(amqp_url, topology, tenants_dir, metrics_port=port, loop_lag_interval_s=LAG_INTERVAL_S)
    running = await start_worker(settings)
    try:
        replies = await client.reply_queue()
        await client.publish_request(runbook("acme", parameters), reply_to=replies.name)
        [message] = await collect(replies, 1, 30)
        [dead] = await collect(await client.channel.get_queue(topology.dead), 1, 30)
        scraped = await scrape(port)
    finally:
        await running.stop()
    reply = json_body(message)
    assert (reply["status"], reply["error"]["code"]) == ("rejected", "invalid_tools")
    assert "time_budget" in reply["error"]["message"]
    assert dead.headers[Header.REASON] == "malformed"
    taken, under = scraped.loop_lags(MAX_LOOP_LAG_LARGE_ANSWER_S)
    assert under == taken, f"the event loop lagged more than {MAX_LOOP_LAG_LARGE_ANSWER_S}s:\n{scraped.text}"

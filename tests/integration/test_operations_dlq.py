"""An operator works the dead-letter queue with `atlas-worker dlq …` while the worker runs."""

import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from contracts import Header, InferenceReply, Status, Topology
from tests import samples
from tests.broker import BrokerClient, collect, drain_now
from tests.conftest import RunningWorker, write_tenant
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.ops.cli import CliResult, atlas_worker
from tests.scene import tenants_reloaded

pytestmark = pytest.mark.broker

LEAKED_TOKEN = "sk-live-4f9a8b7c6d5e4f3a"  # a provider key pasted into an application log
PUBLISHER_SECRET = "hunter2-publisher-secret"


async def dlq(amqp_url: str, topology: Topology, *args: str, stdin: str = "") -> CliResult:
    return await atlas_worker(
        "dlq", args[0], *args[1:], "--namespace", topology.namespace, amqp_url=amqp_url, stdin=stdin
    )


async def dead_count(client: BrokerClient) -> int:
    channel = await client.connection.channel()
    try:
        queue = await channel.declare_queue(client.topology.dead, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def wait_for_dead_letters(client: BrokerClient, count: int) -> None:
    for _ in range(300):
        if await dead_count(client) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} dead letters, found {await dead_count(client)}")


def request_with_leaked_secret(tenant: str) -> dict[str, Any]:
    body = samples.request(tenant, "summary")
    body["incident"]["logs"].append(
        {
            "ts": "2026-01-01T00:00:00Z",
            "level": "error",
            "message": f"upstream call: Authorization: Bearer {LEAKED_TOKEN}",
        }
    )
    return body


async def test_list_shows_each_dead_letter_with_its_reason_and_show_masks_secrets(
    amqp_url: str,
    client: BrokerClient,
    worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    topology: Topology,
) -> None:
    async with tenants_reloaded(worker.app):
        write_tenant(tenants_dir, "retrier", fake_openai.base_url, policy="queue_and_retry", max_attempts=1)
    fake_openai.always = Fault("server_error")
    failing = request_with_leaked_secret("retrier")
    await client.publish_request(failing, headers={"api-key": PUBLISHER_SECRET})
    await client.publish_request(b"{not json")
    await wait_for_dead_letters(client, 2)

    listed = await dlq(amqp_url, topology, "list")

    assert listed.code == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "REQUEST", "TENANT", "TASK", "REASON", "ERROR", "ATTEMPTS", "AGE"]
    by_reason = {line.split()[4]: line.split() for line in rows}
    assert set(by_reason) == {"exhausted", "malformed"}
    assert by_reason["exhausted"][1:5] == [failing["request_id"], "retrier", "summary", "exhausted"]
    assert by_reason["exhausted"][6] == "1"
    assert by_reason["malformed"][1:6] == ["-", "-", "-", "malformed", "invalid_json"]
    assert "2 shown of 2" in listed.stderr
    # Listing took nothing away.
    assert await dead_count(client) == 2

    as_json = json.loads((await dlq(amqp_url, topology, "list", "--json", "--tenant", "retrier")).stdout)
    assert [(r["tenant"], r["reason"], r["request_id"]) for r in as_json] == [
        ("retrier", "exhausted", failing["request_id"])
    ]
    assert as_json[0]["error_code"]
    assert as_json[0]["age_s"] >= 0

    shown = await dlq(amqp_url, topology, "show", by_reason["exhausted"][0])

    assert shown.code == 0, shown.stderr
    assert f"{Header.REASON}: exhausted" in shown.stdout
    assert f"{Header.ERROR_CODE}: " in shown.stdout
    assert failing["request_id"] in shown.stdout  # the body is there
    assert "api-key: ***" in shown.stdout
    assert "Bearer ***" in shown.stdout
    for secret in (LEAKED_TOKEN, PUBLISHER_SECRET, "sk-test-fake", ":guest@"):
        assert secret not in shown.output
        assert secret not in listed.output
    assert await dead_count(client) == 2

    missing = await dlq(amqp_url, topology, "show", "no-such-id")
    assert missing.code == 1
    assert "no dead letter with id or request id 'no-such-id'" in missing.stderr


async def test_replay_of_one_dead_letter_is_answered_once_the_provider_is_back(
    amqp_url: str,
    client: BrokerClient,
    worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    topology: Topology,
) -> None:
    async with tenants_reloaded(worker.app):
        write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=1)
    replies = await client.reply_queue()
    fake_openai.always = Fault("server_error")  # the provider outage
    outage = [samples.request("acme", "summary") for _ in range(2)]
    for n, body in enumerate(outage):
        await client.publish_request(body, reply_to=replies.name, correlation_id=f"outage-{n}")
    failed = [InferenceReply.model_validate_json(m.body) for m in await collect(replies, 2)]
    assert {r.status for r in failed} == {Status.FAILED}
    await wait_for_dead_letters(client, 2)
    rows = json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)
    first = next(r for r in rows if r["request_id"] == outage[0]["request_id"])

    fake_openai.always = None  # the provider is back
    replayed = await dlq(amqp_url, topology, "replay", first["id"])

    assert replayed.code == 0, replayed.stderr
    assert f"replayed 1 dead letter(s) to {topology.requests}" in replayed.stdout
    [message] = await collect(replies, 1)
    reply = InferenceReply.model_validate_json(message.body)
    assert message.correlation_id == "outage-0"
    assert reply.request_id == outage[0]["request_id"]
    assert reply.status is Status.OK
    assert reply.provenance.attempts == 1  # attempts started again from zero
    remaining = json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)
    assert [r["request_id"] for r in remaining] == [outage[1]["request_id"]]

    nothing = await dlq(amqp_url, topology, "replay")
    assert nothing.code == 2
    assert "--all" in nothing.stderr


async def test_replay_after_a_crash_loop_strips_the_failure_history(
    amqp_url: str, client: BrokerClient, topology: Topology
) -> None:
    declared = await atlas_worker(
        "topology", "declare", "--namespace", topology.namespace, "--delivery-limit", "1", amqp_url=amqp_url
    )
    assert declared.code == 0, declared.stderr
    body = samples.request("acme", "rca")
    await client.publish_request(body, headers={Header.ATTEMPTS: 3, "traceparent": "00-abc-def-01"})
    requests = await client.channel.get_queue(topology.requests)
    # A worker that dies on this message every time: the broker gives up after the delivery limit.
    for _ in range(2):
        message = await requests.get(no_ack=False, timeout=5)
        await message.nack(requeue=True)
    await wait_for_dead_letters(client, 1)

    [row] = json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)
    assert row["reason"] == "delivery_limit"
    assert row["request_id"] == body["request_id"]
    assert row["attempts"] == 3

    replayed = await dlq(amqp_url, topology, "replay", "--reason", "delivery_limit")

    assert replayed.code == 0, replayed.stderr
    [back] = await drain_now(requests)
    assert orjson.loads(back.body) == body
    assert back.headers["traceparent"] == "00-abc-def-01"
    assert back.headers["atlas-replays"] == 1
    assert Header.ATTEMPTS not in back.headers
    assert not [key for key in back.headers if key.startswith("x-death") or key.startswith("x-first-death")]
    assert await dead_count(client) == 0


async def test_purge_asks_first_deletes_by_filter_and_empties_the_queue(
    amqp_url: str, client: BrokerClient, topology: Topology
) -> None:
    assert (await atlas_worker("topology", "declare", "--namespace", topology.namespace, amqp_url=amqp_url)).code == 0
    dead = await client.channel.get_exchange(topology.dead, ensure=False)
    for n in range(130):
        tenant = "acme" if n < 120 else "globex"
        await dead.publish(
            aio_pika.Message(
                orjson.dumps(samples.request(tenant, "summary")),
                headers={Header.REASON: "exhausted", Header.DEAD_LETTERED_AT: "2026-01-01T00:00:00+00:00"},
            ),
            "",
        )

    declined = await dlq(amqp_url, topology, "purge", stdin="n\n")
    assert declined.code == 1
    assert f"Delete all of the 130 dead letter(s) in {topology.dead}; this cannot be undone?" in declined.stdout
    assert await dead_count(client) == 130
    declined = await dlq(amqp_url, topology, "purge", "--tenant", "globex", stdin="n\n")
    assert f"Delete 10 matching of the 130 dead letter(s) in {topology.dead}" in declined.stdout
    assert await dead_count(client) == 130

    by_tenant = await dlq(amqp_url, topology, "purge", "--tenant", "acme", "--yes")
    assert by_tenant.code == 0, by_tenant.stderr
    assert "deleted 120 dead letter(s)" in by_tenant.stdout
    assert "deleted 100/120" in by_tenant.stderr  # progress on long operations, out of those that match
    assert await dead_count(client) == 10

    confirmed = await dlq(amqp_url, topology, "purge", stdin="y\n")
    assert confirmed.code == 0
    assert "deleted 10 dead letter(s)" in confirmed.stdout
    assert await dead_count(client) == 0
    empty = await dlq(amqp_url, topology, "list")
    assert f"no dead letters in {topology.dead}" in empty.stdout


async def test_replay_that_cannot_be_routed_removes_nothing(
    amqp_url: str, client: BrokerClient, topology: Topology
) -> None:
    assert (await atlas_worker("topology", "declare", "--namespace", topology.namespace, amqp_url=amqp_url)).code == 0
    dead = await client.channel.get_exchange(topology.dead, ensure=False)
    await dead.publish(
        aio_pika.Message(orjson.dumps(samples.request("acme")), headers={Header.REASON: "exhausted"}), ""
    )
    await wait_for_dead_letters(client, 1)
    await client.channel.queue_delete(topology.requests)  # the requests exchange now routes nowhere

    replayed = await dlq(amqp_url, topology, "replay", "--all")

    assert replayed.code == 1
    assert "the rest are still dead letters" in replayed.stderr
    assert await dead_count(client) == 1


async def test_dead_letters_are_found_by_request_id_or_a_unique_id_prefix_and_tell_their_story(
    amqp_url: str,
    client: BrokerClient,
    worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    topology: Topology,
) -> None:
    async with tenants_reloaded(worker.app):
        write_tenant(tenants_dir, "retrier", fake_openai.base_url, policy="queue_and_retry", max_attempts=2)
    fake_openai.always = Fault("server_error")
    bodies = [samples.request("retrier", "summary") for _ in range(3)]
    for body in bodies:
        await client.publish_request(body)
    await wait_for_dead_letters(client, 3)
    rows = json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)
    ids = {r["request_id"]: r["id"] for r in rows}
    target = bodies[0]["request_id"]

    by_request = await dlq(amqp_url, topology, "show", target)
    assert by_request.code == 0, by_request.stderr
    assert f"id:      {ids[target]}" in by_request.stdout
    # The story: two real calls, the first parked on ladder level 0 with its next try, the last not retried.
    story = by_request.stdout.split("history (oldest first):\n", 1)[1].split("\nbody:", 1)[0].splitlines()
    assert story[0].split() == ["AT", "CLASS", "CODE", "CALLED", "LEVEL", "NEXT", "TRY"]
    first, last = (line.split() for line in story[1:])
    assert first[1:5] == ["transient", "provider_unavailable", "yes", "0"]
    assert first[5] > first[0]  # the next try was due after the failure
    assert last[1:] == ["transient", "provider_unavailable", "yes", "-", "-"]
    assert len(story) == 3

    prefix = ids[target][:8]
    by_prefix = await dlq(amqp_url, topology, "show", prefix)
    assert by_prefix.code == 0, by_prefix.stderr
    assert f"id:      {ids[target]}" in by_prefix.stdout

    fake_openai.always = None
    replayed = await dlq(amqp_url, topology, "replay", target)
    assert replayed.code == 0, replayed.stderr
    assert "replayed 1 dead letter(s)" in replayed.stdout
    purged = await dlq(amqp_url, topology, "purge", bodies[1]["request_id"], "--yes")
    assert purged.code == 0, purged.stderr
    assert "deleted 1 dead letter(s)" in purged.stdout
    left = json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)
    assert [r["request_id"] for r in left] == [bodies[2]["request_id"]]


async def test_an_ambiguous_prefix_and_unknown_filter_values_are_refused_naming_the_candidates(
    amqp_url: str, client: BrokerClient, topology: Topology
) -> None:
    assert (await atlas_worker("topology", "declare", "--namespace", topology.namespace, amqp_url=amqp_url)).code == 0
    dead = await client.channel.get_exchange(topology.dead, ensure=False)
    for own_id in ("abc1111", "abc2222"):
        headers: dict[str, Any] = {Header.REASON: "exhausted", Header.DEAD_LETTER_ID: own_id}
        await dead.publish(aio_pika.Message(orjson.dumps(samples.request("acme")), headers=headers), "")
    await wait_for_dead_letters(client, 2)

    for command in ("show", "replay", "purge"):
        ambiguous = await dlq(amqp_url, topology, command, "abc", *(("--yes",) if command == "purge" else ()))
        assert ambiguous.code == 1, command
        assert "'abc' names 2 dead letters: abc1111, abc2222; give a longer id" in ambiguous.stderr
    assert await dead_count(client) == 2
    declined = await dlq(amqp_url, topology, "purge", "abc2", stdin="n\n")
    assert f"Delete 1 matching of the 2 dead letter(s) in {topology.dead}" in declined.stdout
    assert (await dlq(amqp_url, topology, "purge", "abc2", "--yes")).code == 0
    assert [r["id"] for r in json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)] == ["abc1111"]

    for args in (("list", "--reason", "exhausteed"), ("purge", "--task", "rcaa", "--yes")):
        refused = await dlq(amqp_url, topology, *args)
        assert refused.code == 2
        [line] = refused.stderr.splitlines()
        assert line.startswith(f"unknown {args[1]} ")
        known_values = ("exhausted", "delivery_limit") if args[1] == "--reason" else ("rca", "runbook")
        assert all(value in line for value in known_values)
    known = await dlq(amqp_url, topology, "list", "--reason", "delivery_limit")
    assert known.code == 0, known.stderr

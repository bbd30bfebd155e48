"""A hostile publisher on the real broker: oversized bodies and headers, out-of-range integers, forged worker
headers, probe floods, label floods, and publishers restricted by AMQP user, tenant and reply_to."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from structlog.testing import capture_logs

from contracts import Header, Topology
from tests import samples
from tests.broker import AmqpUser, BrokerClient, broker_client, collect, drain_now, json_body
from tests.conftest import RunningWorker, running_worker, start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.integration.test_operations_dlq import dlq, wait_for_dead_letters
from tests.integration.test_process_lifecycle import wait_until
from tests.ops.scrape import Samples, free_port, scrape
from tests.scene import Scene, open_scene
from worker.broker.amqp_url import login_user
from worker.broker.consumer import MAX_BODY_BYTES, Settled
from worker.broker.header_trust import HeaderTrust
from worker.broker.limits import DEAD_LETTER_BODY_PREFIX_BYTES, MAX_BODY_ENTRIES, MAX_COUNT
from worker.broker.publishers import PublisherRules

pytestmark = pytest.mark.broker


def count_reconnects(running: RunningWorker) -> list[object]:
    """Every time the worker's broker connection is re-established (the broker closed it)."""
    reconnects: list[object] = []
    assert running.app.connection is not None
    running.app.connection.reconnect_callbacks.add(lambda *args: reconnects.append(args))
    return reconnects


async def dead_letters(client: BrokerClient, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    dead = await client.channel.get_queue(client.topology.dead)
    return await collect(dead, count, 30)


async def publish(client: BrokerClient, body: bytes | dict[str, Any], **properties: Any) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    exchange = await client.channel.get_exchange(client.topology.requests, ensure=False)
    message = aio_pika.Message(raw, content_type="application/json", **properties)
    await exchange.publish(message, "request")


# --- 4: bounded bodies, headers and integers -----------------------------------------------------------------


async def test_an_oversized_body_is_dead_lettered_as_a_bounded_prefix_with_headers_saying_why(
    scene: Scene, amqp_url: str, topology: Topology
) -> None:
    body = (
        b'{"request_id": "huge", "tenant_id": "acme", "task": "summary", "padding": "'
        + b"x" * (MAX_BODY_BYTES + 1000)
        + b'"}'
    )

    await scene.client.publish_request(body, reply_to=scene.replies.name, correlation_id="huge")
    # Not read: the ids it claims are taken from the members that lead it, so the publisher can match the reply.
    await scene.settled("huge")
    listed = await dlq(amqp_url, topology, "list", "--tenant", "acme", "--json")
    [row] = json.loads(listed.stdout)
    replayed = await dlq(amqp_url, topology, "replay", row["id"])  # named, but its body's tail is gone

    left = await scene.leftovers()
    [reply] = left.replies
    [dead] = left.dead

    answered = json_body(reply)
    assert (answered["request_id"], answered["tenant_id"]) == ("huge", "acme")
    assert answered["error"]["code"] == "body_too_large"
    assert len(dead.body) == DEAD_LETTER_BODY_PREFIX_BYTES
    assert body.startswith(dead.body)
    assert dead.headers[Header.BODY_TRUNCATED] is True
    assert dead.headers[Header.ORIGINAL_BODY_BYTES] == len(body)
    assert dead.headers[Header.ERROR_CODE] == "body_too_large"
    assert (dead.headers[Header.REQUEST_ID], dead.headers[Header.TENANT_ID]) == ("huge", "acme")
    assert listed.code == 0, listed.stderr
    assert (row["request_id"], row["tenant"]) == ("huge", "acme")
    assert replayed.code == 0, replayed.stderr
    assert "replayed 0 dead letter(s)" in replayed.stdout
    assert "hold only the first part of their body" in replayed.stderr


async def test_an_oversized_draft_is_dead_lettered_as_a_prefix_with_its_keys_masked(scene: Scene) -> None:
    draft = {"kind": "openai_compatible", "base_url": "https://llm.example", "model": "m", "api_key": "lit-key-1"}
    request = {"request_id": "huge-draft", "tenant_id": "newco", "task": "test_connection", "provider": draft}
    body = orjson.dumps(request)[:-1] + b', "padding": "' + b"x" * MAX_BODY_BYTES  # cut short: not JSON either

    await scene.client.publish_request(body, reply_to=scene.replies.name, correlation_id="huge-draft")
    await scene.settled("huge-draft")

    [dead] = (await scene.leftovers()).dead
    assert len(dead.body) <= DEAD_LETTER_BODY_PREFIX_BYTES
    assert b"lit-key-1" not in dead.body
    assert b'"api_key":"***"' in dead.body
    assert b'"base_url":"https://llm.example"' in dead.body  # what is not secret stays readable
    assert dead.headers[Header.REDACTED] is True
    assert dead.headers[Header.BODY_TRUNCATED] is True


def big_headers(total_bytes: int) -> dict[str, Any]:
    """Publisher headers that together come close to the 128 KiB frame: the publish itself still fits."""
    piece = 16 * 1024
    headers = {f"x-pad-{n}": "p" * piece for n in range(total_bytes // piece)}
    headers["x-pad-rest"] = "p" * (total_bytes % piece)
    return headers


async def test_130kb_of_publisher_headers_neither_drop_the_connection_nor_delay_other_tenants(scene: Scene) -> None:
    await scene.tenant("acme")
    reconnects = count_reconnects(scene.running)
    # Malformed, so the worker dead-letters it: a copy with the publisher's headers plus its own.
    await scene.client.publish_request(b"{not json", headers=big_headers(129_000), reply_to=scene.replies.name)
    for n in range(5):
        await scene.send(samples.request("acme", request_id=f"after-{n}"))
    await scene.settled(None)

    left = await scene.leftovers()
    answered = [json_body(m) for m in left.replies]
    [dead] = left.dead

    assert sorted(r["status"] for r in answered) == ["ok"] * 5 + ["rejected"]
    assert dead.headers[Header.REASON] == "malformed"
    assert isinstance(dropped := dead.headers[Header.HEADERS_DROPPED], int)
    assert dropped >= 1
    assert "x-death" not in dead.headers  # the worker settled it, not the broker's delivery limit
    assert reconnects == []


# Without the entry bound, validating the 4 MiB body below takes 0.6-1.5 s on the loop; with it the loop's worst wait
# is counting up to the bound on a thread (GIL switches) and masking the dead letter's copy: well under this.
MAX_LOOP_LAG_S = 0.1


async def test_4_mib_of_tiny_entries_is_refused_unread_and_never_stalls_other_tenants(
    amqp_url: str, topology: Topology, tenants_dir: Path, client: BrokerClient, fake_openai: FakeOpenAI
) -> None:
    request = samples.request("acme", request_id="tiny-alerts")
    request["incident"]["alerts"] = [{"name": ""}] * 340_000  # 680,000 entries in 4 MiB: a second or more to validate
    body = orjson.dumps(request)
    assert len(body) <= MAX_BODY_BYTES
    port = free_port()
    lag = {"metrics_port": port, "loop_lag_interval_s": 0.01}
    async with open_scene(amqp_url, topology, tenants_dir, client, fake_openai, **lag) as scene:
        await scene.tenant("acme")
        await scene.tenant("beta")
        await client.publish_request(body, reply_to=scene.replies.name, correlation_id="tiny-alerts")
        for n in range(5):
            await scene.send(samples.request("beta", request_id=f"beta-{n}"))
        await scene.settled("tiny-alerts")  # refused before it is read, by the ids its leading members claim
        left = await scene.leftovers()
        scraped = await scrape(port)

    replies = {m.correlation_id: json_body(m) for m in left.replies}
    refused = replies.pop("tiny-alerts")
    assert (refused["status"], refused["error"]["code"]) == ("rejected", "body_too_large")
    assert (refused["request_id"], refused["tenant_id"]) == ("tiny-alerts", "acme")
    assert f"more than {MAX_BODY_ENTRIES:,} entries" in refused["error"]["message"]
    assert [r["status"] for r in replies.values()] == ["ok"] * 5
    [dead] = left.dead
    assert dead.headers[Header.REASON] == "malformed"
    assert len(dead.body) == DEAD_LETTER_BODY_PREFIX_BYTES  # kept as a prefix, as a body over the byte limit is
    assert body.startswith(dead.body)
    assert dead.headers[Header.BODY_TRUNCATED] is True
    assert dead.headers[Header.ORIGINAL_BODY_BYTES] == len(body)
    assert len(fake_openai.requests) == 5  # beta's five: the refused body never reached the provider
    taken, under = scraped.loop_lags(MAX_LOOP_LAG_S)
    assert taken > 0
    assert under == taken, f"the event loop lagged more than {MAX_LOOP_LAG_S}s:\n{scraped.text}"


async def test_oversized_worker_headers_beside_a_forged_x_death_do_not_drop_the_connection(scene: Scene) -> None:
    await scene.tenant("acme")
    reconnects = count_reconnects(scene.running)
    # Without a header key, a forged x-death makes the worker believe its own headers, and it carries believed
    # headers onto its copies whole: 120 KB of them, plus what the worker adds, would pass frame_max.
    forged_death = [{"queue": scene.client.topology.retry_queue(0), "reason": "expired", "count": 1}]
    padded = {
        Header.FIRST_FAILURE_AT: "2" * 40_000,
        Header.ORIGINAL_EXCHANGE: "e" * 40_000,
        Header.ORIGINAL_ROUTING_KEY: "k" * 40_000,
        "x-death": forged_death,
    }
    # Unknown task: dead-lettered at once, a copy with the believed headers and the worker's failure headers.
    await scene.send({"request_id": "padded", "tenant_id": "acme", "task": "no-such-task"}, headers=padded)
    await scene.send(samples.request("acme", request_id="after"))

    left = await scene.leftovers()
    [dead] = left.dead

    assert sorted(json_body(m)["status"] for m in left.replies) == ["ok", "rejected"]
    assert dead.headers[Header.REASON] == "malformed"
    assert dead.headers[Header.ORIGINAL_EXCHANGE] == scene.client.topology.requests  # its own, not the forged one
    assert len(str(dead.headers[Header.FIRST_FAILURE_AT])) < 64
    assert reconnects == []


@pytest.mark.parametrize("attempts", [2**63 - 1, -(2**63), -5, True, "3", 2.5])
async def test_attempts_header_out_of_range_or_of_the_wrong_type_never_loops_the_message(
    scene: Scene, attempts: Any
) -> None:
    await scene.tenant("acme", policy="queue_and_retry", max_attempts=2)
    scene.fake.always = Fault("server_error")
    reconnects = count_reconnects(scene.running)
    # A forged x-death, as if back from the ladder: without a header key the worker believes it.
    forged_death = [{"queue": scene.client.topology.retry_queue(0), "reason": "expired", "count": 1}]

    await scene.send(samples.request("acme"), headers={Header.ATTEMPTS: attempts, "x-death": forged_death})

    left = await scene.leftovers()
    [reply] = left.replies
    [dead] = left.dead

    assert json_body(reply)["status"] == "failed"
    assert dead.headers[Header.REASON] == "exhausted"
    attempts_written = dead.headers[Header.ATTEMPTS]
    assert isinstance(attempts_written, int)
    assert 1 <= attempts_written <= MAX_COUNT + 1  # the clamped count plus this attempt
    assert json_body(reply)["provenance"]["attempts"] == dead.headers[Header.ATTEMPTS]
    assert reconnects == []


# --- 5: probes count against the tenant's concurrency ---------------------------------------------------------


async def test_a_flood_of_hanging_probes_does_not_delay_another_tenants_request(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path
) -> None:
    hanging, healthy = FakeOpenAI(), FakeOpenAI()
    await hanging.start()
    await healthy.start()
    hanging.always = Fault("hang")
    write_tenant(tenants_dir, "prober", hanging.base_url, timeout_s=3, max_concurrency=2)
    write_tenant(tenants_dir, "acme", healthy.base_url)
    order: list[Settled] = []
    from worker.app import WorkerApp

    app = WorkerApp(worker_settings(amqp_url, topology, tenants_dir), on_settled=order.append)
    task = asyncio.create_task(app.run())
    await asyncio.wait_for(app.ready.wait(), 30)
    try:
        replies = await client.reply_queue()
        for n in range(70):
            probe = samples.request("prober", "test_connection", request_id=f"probe-{n}")
            probe.pop("incident", None)
            await client.publish_request(probe, reply_to=replies.name)
        await client.publish_request(samples.request("acme", request_id="other"), reply_to=replies.name)

        [first] = await collect(replies, 1, timeout_s=30)
    finally:
        app.stop()
        await asyncio.wait_for(task, 60)
        await hanging.close()
        await healthy.close()

    # Answered while the probes still hang (each waits out its 3 s timeout), not after them.
    assert json_body(first)["request_id"] == "other"
    replied = [s.ids.request_id for s in order if s.done == "replied"]
    assert replied[0] == "other"


async def test_drafts_naming_a_tenant_do_not_take_the_slots_its_own_requests_need(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path
) -> None:
    # A draft tests the publisher's endpoint, not the tenant's: were it counted against the tenant's
    # max_concurrency, two drafts at a tarpit would defer every request of that tenant until they time out.
    hanging, healthy = FakeOpenAI(), FakeOpenAI()
    await hanging.start()
    await healthy.start()
    hanging.always, hanging.api_key = Fault("hang"), None
    write_tenant(tenants_dir, "small", healthy.base_url, max_concurrency=2)
    draft = {"kind": "openai_compatible", "base_url": hanging.base_url, "model": hanging.model, "api_key": "lit-123"}
    settings = worker_settings(amqp_url, topology, tenants_dir, allow_draft_cidrs=("127.0.0.0/8",))
    try:
        async with running_worker(settings):
            replies = await client.reply_queue()
            for n in range(4):
                probe = {"request_id": f"draft-{n}", "tenant_id": "small", "task": "test_connection", "provider": draft}
                await client.publish_request(probe, reply_to=replies.name)
            await wait_until(lambda: len(hanging.requests) >= 2)  # both draft slots held at the tarpit
            await client.publish_request(samples.request("small", request_id="own"), reply_to=replies.name)

            [first] = await collect(replies, 1, timeout_s=30)
    finally:
        await hanging.close()
        await healthy.close()

    assert json_body(first)["request_id"] == "own"  # answered while the drafts still hang
    assert json_body(first)["status"] == "ok"


# --- 6: closed label sets -------------------------------------------------------------------------------------


async def test_hostile_task_values_add_no_metric_series(scene: Scene) -> None:
    from prometheus_client import generate_latest

    await scene.tenant("acme")
    hostile = [f"task-{uuid.uuid4().hex}" for _ in range(30)] + ["\n", 'x"}', "rca\x00"]
    for task in hostile:
        await scene.client.publish_request({**samples.request("acme"), "task": task}, reply_to=scene.replies.name)
    await scene.send(samples.request("acme"))
    for _ in hostile:
        await scene.settled(None)

    left = await scene.leftovers()
    assert (len(left.replies), len(left.dead)) == (len(hostile) + 1, len(hostile))
    scraped = Samples(generate_latest(scene.app.metrics.registry).decode())
    tasks = {labels["task"] for name, labels, _ in scraped.rows if "task" in labels}
    assert tasks <= {"rca", "runbook", "summary", "chat", "test_connection", "other", "none"}
    assert "other" in tasks
    settled = [row for row in scraped.rows if row[0] == "atlas_worker_settled_total"]
    assert len(settled) <= 3


# --- 8: worker headers are not trusted from publishers ---------------------------------------------------------


FORGED = {
    Header.ATTEMPTS: 2,
    Header.FIRST_FAILURE_AT: "2001-01-01T00:00:00+00:00",
    Header.ORIGINAL_EXCHANGE: "forged-exchange",
    Header.ORIGINAL_ROUTING_KEY: "forged-key",
    Header.REROUTED_FROM_TENANT: "victim",
    Header.REROUTED_AT: "2001-01-01T00:00:00+00:00",
    Header.DEAD_LETTER_ID: "forged-id",
    Header.HISTORY: '[{"at":"2001-01-01T00:00:00Z","code":"forged_code","provider_called":true}]',
}


@pytest.mark.parametrize("header_key", [None, "env:ATLAS_TEST_HEADER_KEY"])
async def test_forged_worker_headers_on_a_fresh_publish_neither_skip_the_ladder_nor_forge_provenance(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    header_key: str | None,
) -> None:
    monkeypatch.setenv("ATLAS_TEST_HEADER_KEY", "a-key-only-the-worker-knows")
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=3)
    fake_openai.always = Fault("server_error")
    async with open_scene(amqp_url, topology, tenants_dir, client, fake_openai, header_key=header_key) as scene:
        await scene.send(samples.request("acme"), headers=FORGED)
        left = await scene.leftovers()
    [reply] = left.replies
    [dead] = left.dead

    assert json_body(reply)["provenance"]["attempts"] == 3
    assert len(fake_openai.requests) == 3  # every attempt of the ladder was made
    assert dead.headers[Header.ATTEMPTS] == 3
    assert dead.headers[Header.ORIGINAL_EXCHANGE] == topology.requests
    assert dead.headers[Header.ORIGINAL_ROUTING_KEY] == "request"
    assert str(dead.headers[Header.FIRST_FAILURE_AT]) > "2026"
    assert Header.REROUTED_FROM_TENANT not in dead.headers
    assert dead.headers[Header.DEAD_LETTER_ID] != "forged-id"
    # The story is the worker's own, carried across both ladder hops: three real calls, no forged entry.
    story = orjson.loads(str(dead.headers[Header.HISTORY]))
    assert [(e["code"], e["provider_called"], e.get("level")) for e in story] == [
        ("provider_unavailable", True, 0),
        ("provider_unavailable", True, 1),
        ("provider_unavailable", True, None),
    ]
    assert json_body(reply)["provenance"]["history"] == story


async def test_a_signed_ladder_header_copied_onto_another_request_is_not_believed(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ATLAS_TEST_HEADER_KEY", "a-key-only-the-worker-knows")
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=2)
    fake_openai.always = Fault("server_error")
    key = "env:ATLAS_TEST_HEADER_KEY"
    async with open_scene(amqp_url, topology, tenants_dir, client, fake_openai, header_key=key) as scene:
        await scene.send(samples.request("acme", request_id="first"))
        [dead] = (await scene.leftovers()).dead
        stolen = {k: v for k, v in dead.headers.items() if k in (Header.ATTEMPTS, Header.SIGNATURE)}
        await scene.send(samples.request("acme", request_id="second"), headers=stolen)
        [reply] = (await scene.leftovers()).replies

    assert json_body(reply)["request_id"] == "second"
    assert json_body(reply)["provenance"]["attempts"] == 2
    assert len(fake_openai.requests) == 4


@pytest.mark.parametrize("previous", [True, False], ids=["old-key-kept", "old-key-dropped"])
async def test_attempts_signed_with_a_key_being_rotated_out_are_believed_while_it_is_kept(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    previous: bool,
) -> None:
    monkeypatch.setenv("ATLAS_TEST_OLD_KEY", "the-key-before-the-rotation")
    monkeypatch.setenv("ATLAS_TEST_NEW_KEY", "the-key-after-the-rotation")
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=3)
    fake_openai.always = Fault("server_error")
    # A retry a replica with the old key put on the ladder: two attempts made, signed with that key.
    old = HeaderTrust(topology, b"the-key-before-the-rotation")
    made = {Header.ATTEMPTS: 2}
    keys: dict[str, object] = {"header_key": "env:ATLAS_TEST_NEW_KEY"}
    if previous:
        keys["header_key_previous"] = ("env:ATLAS_TEST_OLD_KEY",)
    async with open_scene(amqp_url, topology, tenants_dir, client, fake_openai, **keys) as scene:
        await scene.send(samples.request("acme", request_id="rotated"), headers=made | old.signature("rotated", made))
        [reply] = (await scene.leftovers()).replies

    assert json_body(reply)["provenance"]["attempts"] == 3
    assert len(fake_openai.requests) == (1 if previous else 3)  # the last attempt, or the ladder from the start


@pytest.mark.parametrize("replay_key", [True, False], ids=["signed", "unsigned"])
async def test_a_replay_signed_with_the_workers_key_outranks_the_dead_letters_reply(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    replay_key: bool,
) -> None:
    # Of several replies to one request id the highest settle_seq wins: the replay's answer must beat the failure
    # its dead letter was replied with. The replay raises atlas-settle-seq; only a signed value is believed.
    monkeypatch.setenv("ATLAS_TEST_HEADER_KEY", "a-key-only-the-worker-knows")
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=2)
    fake_openai.always = Fault("server_error")
    key = "env:ATLAS_TEST_HEADER_KEY"
    async with open_scene(amqp_url, topology, tenants_dir, client, fake_openai, header_key=key) as scene:
        await scene.send(samples.request("acme", request_id="replayed"))
        fake_openai.always = None  # the provider is fixed, then the operator replays
        signing = ("--header-key", key) if replay_key else ()
        replayed = await dlq(amqp_url, topology, "replay", "replayed", *signing)
        await scene.settled("replayed")
        left = await scene.leftovers()

    assert replayed.code == 0, replayed.stderr
    failed, answered = (json_body(m) for m in left.replies)
    assert (failed["status"], answered["status"]) == ("failed", "ok")
    if replay_key:
        assert answered["provenance"]["settle_seq"] > failed["provenance"]["settle_seq"]
    else:  # nothing vouches for the raised value: the operator is told the replies will not rank
        assert answered["provenance"]["settle_seq"] == 0
        assert "--header-key" in replayed.stderr


async def test_a_worker_without_a_header_key_says_at_start_that_its_headers_can_be_forged(
    amqp_url: str, topology: Topology, tenants_dir: Path, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATLAS_TEST_HEADER_KEY", "a-key-only-the-worker-knows")
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    with capture_logs() as unsigned:
        async with running_worker(worker_settings(amqp_url, topology, tenants_dir)):
            pass
    with capture_logs() as signed:
        async with running_worker(
            worker_settings(amqp_url, topology, tenants_dir, header_key="env:ATLAS_TEST_HEADER_KEY")
        ):
            pass

    [warning] = [e for e in unsigned if e["event"] == "header_key_missing"]
    assert "--header-key" in warning["fix"]
    assert [e for e in signed if e["event"] == "header_key_missing"] == []


# --- 8: who may publish what ---------------------------------------------------------------------------------


Send = Callable[..., Awaitable[None]]


@asynccontextmanager
async def publishing_as(
    user: AmqpUser,
    rules: PublisherRules,
    amqp_url: str,
    topology: Topology,
    tenants_dir: Path,
    client: BrokerClient,
    fake_openai: FakeOpenAI,
) -> AsyncIterator[tuple[Scene, Send]]:
    """A scene whose worker applies `rules`, and `send`, which publishes a request as `user` (its `user_id`
    set, answers to the scene's reply queue, unless the call says otherwise)."""
    async with (
        open_scene(amqp_url, topology, tenants_dir, client, fake_openai, publishers=rules) as scene,
        broker_client(user.url, topology) as publisher,
    ):

        async def send(body: dict[str, Any], **properties: Any) -> None:
            await publish(publisher, body, **({"user_id": user.name, "reply_to": scene.replies.name} | properties))

        yield scene, send


async def test_restricted_publishers_are_checked_by_user_tenant_and_reply_to(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    other_user: AmqpUser,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    write_tenant(tenants_dir, "globex", fake_openai.base_url)
    rules = PublisherRules.parse([f"{other_user.name}=acme"], ["replies-*"])
    async with publishing_as(other_user, rules, amqp_url, topology, tenants_dir, client, fake_openai) as (scene, send):
        victim = await client.channel.declare_queue(f"victim-{uuid.uuid4().hex[:8]}", exclusive=True)
        await send(samples.request("acme", request_id="allowed"))
        await send(samples.request("acme", request_id="anonymous"), user_id=None)
        await send(samples.request("globex", request_id="other-tenant"))
        await send(samples.request("acme", request_id="injected"), reply_to=victim.name, correlation_id="their-rpc")
        for request_id in ("allowed", "anonymous", "other-tenant", "injected"):
            await scene.settled(request_id)
        left = await scene.leftovers()
        injected = await drain_now(victim)

    answered = {json_body(m)["request_id"]: json_body(m) for m in left.replies}
    refused = left.dead
    assert len(answered) == 3
    assert answered["allowed"]["status"] == "ok"
    assert answered["anonymous"]["status"] == "rejected"
    assert answered["anonymous"]["error"]["code"] == "publisher_refused"
    assert answered["other-tenant"]["error"]["code"] == "publisher_refused"
    assert injected == []  # nothing is ever sent to a reply_to outside the allowed names
    assert {m.headers[Header.REASON] for m in refused} == {"publisher_refused"}
    assert {json_body(m)["request_id"] for m in refused} == {"anonymous", "other-tenant", "injected"}


async def test_a_body_that_is_not_a_request_is_refused_as_a_publishers_for_a_user_or_tenant_the_rules_refuse(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    other_user: AmqpUser,
    third_user: AmqpUser,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    rules = PublisherRules.parse([f"{other_user.name}=acme"], [])
    async with (
        publishing_as(other_user, rules, amqp_url, topology, tenants_dir, client, fake_openai) as (scene, send),
        broker_client(third_user.url, topology) as unlisted,
    ):
        # Not JSON, and over the byte limit: from a user the rules do not list, neither is read as a request.
        as_unlisted = {"user_id": third_user.name, "reply_to": scene.replies.name}
        await publish(unlisted, b"{not json", correlation_id="bad", **as_unlisted)
        huge = b'{"request_id": "huge", "padding": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
        await publish(unlisted, huge, correlation_id="huge", **as_unlisted)
        await send(b"{listed but not json", correlation_id="listed")
        # From the listed user, but not valid requests: the tenant each claims is checked as a valid one's would be.
        await send(b'{"request_id": "own", "tenant_id": "acme", "task": "summary"}', correlation_id="own")
        await send(b'{"request_id": "other", "tenant_id": "globex", "task": "summary"}', correlation_id="other")
        huge_for_other = huge.replace(b'"padding"', b'"tenant_id": "globex", "padding"')
        await send(huge_for_other, correlation_id="huge-other")
        for _ in range(6):
            await scene.settled(None)
        left = await scene.leftovers()

    answered = {m.correlation_id: json_body(m)["error"]["code"] for m in left.replies}
    assert answered == {
        "bad": "publisher_refused",
        "huge": "publisher_refused",
        "listed": "invalid_json",
        "own": "invalid_request",
        "other": "publisher_refused",
        "huge-other": "publisher_refused",
    }
    reasons = sorted(str(m.headers[Header.REASON]) for m in left.dead)
    assert reasons == ["malformed"] * 2 + ["publisher_refused"] * 4
    assert len(fake_openai.requests) == 0


async def test_the_broker_refuses_a_user_id_that_is_not_the_connections_user(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path
) -> None:
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir))
    try:
        channel = await client.connection.channel()
        exchange = await channel.get_exchange(topology.requests, ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await exchange.publish(aio_pika.Message(b"{}", user_id="admin"), "request")
    finally:
        await running.stop()


async def test_a_publisher_cannot_pass_for_the_worker_by_its_user_id(
    amqp_url: str, topology: Topology, worker: RunningWorker, other_user: AmqpUser
) -> None:
    async with broker_client(other_user.url, topology) as publisher:
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await publish(publisher, samples.request("acme"), user_id=login_user(amqp_url))


async def test_a_refused_publisher_is_refused_whatever_worker_headers_it_forges(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    other_user: AmqpUser,
) -> None:
    write_tenant(tenants_dir, "globex", fake_openai.base_url, policy="queue_and_retry")
    rules = PublisherRules.parse([f"{other_user.name}=acme"], [])
    forged = {
        Header.ATTEMPTS: 1,
        Header.SETTLE_SEQ: 3,
        Header.REPLAYS: 1,
        Header.ORIGINAL_EXCHANGE: topology.requests,
        "atlas-signature": {Header.ATTEMPTS: "00" * 32},
        # What the broker writes when a retry level's TTL sends a worker's copy back.
        "x-death": [
            {"queue": topology.retry_queue(0), "reason": "expired", "count": 1, "exchange": topology.retry},
        ],
        "x-first-death-reason": "expired",
    }
    async with publishing_as(other_user, rules, amqp_url, topology, tenants_dir, client, fake_openai) as (scene, send):
        await send(samples.request("globex", request_id="forged"), headers=forged)
        await scene.settled("forged")
        left = await scene.leftovers()

    [reply] = [json_body(m) for m in left.replies]
    assert reply["status"] == "rejected"
    assert reply["error"]["code"] == "publisher_refused"
    [dead] = left.dead
    assert dead.headers[Header.REASON] == "publisher_refused"
    assert fake_openai.requests == []
    assert (left.retry, left.cloud) == ([], [])


async def test_with_publisher_rules_a_request_retried_on_the_ladder_comes_back_and_is_answered(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    other_user: AmqpUser,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=3)
    fake_openai.faults.append(Fault("server_error"))
    rules = PublisherRules.parse([f"{other_user.name}=acme"], ["replies-*"])
    async with publishing_as(other_user, rules, amqp_url, topology, tenants_dir, client, fake_openai) as (scene, send):
        await send(samples.request("acme", request_id="retried"), correlation_id="their-rpc")
        await scene.settled("retried")
        left = await scene.leftovers()

    [message] = left.replies
    reply = json_body(message)
    assert (reply["status"], reply["provenance"]["attempts"]) == ("ok", 2)
    assert message.correlation_id == "their-rpc"
    [retry] = left.retry
    assert retry.user_id == login_user(amqp_url)  # published as the worker, which the broker vouches for
    assert retry.reply_to == scene.replies.name
    assert (left.cloud, left.dead) == ([], [])


async def test_with_publisher_rules_a_deferred_request_comes_back_and_is_answered(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    other_user: AmqpUser,
) -> None:
    # One call at a time, each a second long: the second request finds the tenant busy and is deferred.
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="fail_closed", max_concurrency=1)
    fake_openai.latency_s = 1.0
    rules = PublisherRules.parse([f"{other_user.name}=acme"], [])
    async with publishing_as(other_user, rules, amqp_url, topology, tenants_dir, client, fake_openai) as (scene, send):
        for request_id in ("first", "second"):
            await send(samples.request("acme", request_id=request_id))
        for request_id in ("first", "second"):
            await scene.settled(request_id)
        left = await scene.leftovers()

    assert sorted((json_body(m)["request_id"], json_body(m)["status"]) for m in left.replies) == [
        ("first", "ok"),
        ("second", "ok"),
    ]
    assert left.retry, "nothing was deferred"
    assert {m.user_id for m in left.retry} == {login_user(amqp_url)}
    assert left.dead == []


@pytest.mark.parametrize("replayer", ["worker", "listed publisher"])
async def test_with_publisher_rules_a_replayed_dead_letter_is_answered(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    other_user: AmqpUser,
    replayer: str,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=1)
    fake_openai.always = Fault("server_error")  # the provider outage
    rules = PublisherRules.parse([f"{other_user.name}=acme"], [])
    async with publishing_as(other_user, rules, amqp_url, topology, tenants_dir, client, fake_openai) as (scene, send):
        await send(samples.request("acme", request_id="outage"))
        await scene.settled("outage")
        [failed] = await drain_now(scene.replies)
        fake_openai.always = None  # the provider is back

        replay_url = amqp_url if replayer == "worker" else other_user.url
        replayed = await dlq(replay_url, topology, "replay", "outage")
        assert replayed.code == 0, replayed.stderr
        await scene.settled("outage")
        left = await scene.leftovers()

    assert json_body(failed)["status"] == "failed"
    [reply] = [json_body(m) for m in left.replies]
    assert (reply["request_id"], reply["status"]) == ("outage", "ok")
    assert left.dead == []


async def test_replay_leaves_a_refused_publishers_dead_letters_until_an_operator_names_them(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    other_user: AmqpUser,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    write_tenant(tenants_dir, "globex", fake_openai.base_url)
    rules = PublisherRules.parse([f"{other_user.name}=acme"], [])
    async with publishing_as(other_user, rules, amqp_url, topology, tenants_dir, client, fake_openai) as (scene, send):
        await send(samples.request("globex", request_id="not-theirs"))
        await scene.settled("not-theirs")
        [refused] = await drain_now(scene.replies)

        everything = await dlq(amqp_url, topology, "replay", "--all")
        still = json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)
        named = await dlq(amqp_url, topology, "replay", "not-theirs")
        await scene.settled("not-theirs")
        left = await scene.leftovers()

    assert json_body(refused)["error"]["code"] == "publisher_refused"
    assert everything.code == 0, everything.stderr
    assert "replayed 0 dead letter(s)" in everything.stdout
    assert "publisher_refused" in everything.stderr
    assert [(r["request_id"], r["reason"]) for r in still] == [("not-theirs", "publisher_refused")]
    # Named on purpose, it is the operator's request now: replayed as the worker's user, it is answered.
    assert named.code == 0, named.stderr
    assert [json_body(m)["status"] for m in left.replies] == ["ok"]
    assert left.dead == []


# --- 7: dead letters belong to the worker ----------------------------------------------------------------------


async def test_dead_letters_get_worker_ids_so_a_shared_message_id_cannot_purge_someone_elses(
    amqp_url: str, client: BrokerClient, worker: RunningWorker, topology: Topology
) -> None:
    await publish(client, b"{real dead letter", message_id="same-id")
    await publish(client, b"{attacker's copy", message_id="same-id")
    await wait_for_dead_letters(client, 2)

    listed = await dlq(amqp_url, topology, "list", "--json")
    ids = [row["id"] for row in json.loads(listed.stdout)]
    purged = await dlq(amqp_url, topology, "purge", ids[1], "--yes")
    left = await dlq(amqp_url, topology, "list", "--json")

    assert len(set(ids)) == 2
    assert "same-id" not in ids
    assert purged.code == 0, purged.stderr
    assert "deleted 1 " in purged.stdout
    assert [row["id"] for row in json.loads(left.stdout)] == [ids[0]]


async def test_dlq_output_escapes_control_characters_and_cannot_be_made_to_print_forged_rows(
    amqp_url: str, client: BrokerClient, worker: RunningWorker, topology: Topology
) -> None:
    forged_row = "FORGED  acme  rca  exhausted  -  1  1s"
    body = orjson.dumps({"request_id": "r\x1b[2J", "tenant_id": f"acme\n{forged_row}", "task": "rca"})
    await publish(client, body, app_id="\x1b]0;pwned\x07", correlation_id=f"c\n{forged_row}")
    await wait_for_dead_letters(client, 1)

    listed = await dlq(amqp_url, topology, "list")
    [row] = json.loads((await dlq(amqp_url, topology, "list", "--json")).stdout)
    shown = await dlq(amqp_url, topology, "show", row["id"])

    assert listed.code == 0, listed.stderr
    assert shown.code == 0, shown.stderr
    assert len(listed.stdout.splitlines()) == 2  # the column names and one row
    for output in (listed.stdout, shown.stdout):
        assert "\x1b" not in output
        assert "\x07" not in output
        assert not any(line.startswith("FORGED") for line in output.splitlines())
    assert "\\n" in listed.stdout  # the newline is shown, escaped


async def test_cc_and_bcc_headers_do_not_fan_the_workers_copies_out_to_other_routing_keys(scene: Scene) -> None:
    # RabbitMQ routes a message to its CC and BCC headers' keys too. A copy the worker publishes (here a reroute
    # of a tenant with no BYOC config) must go where the worker sends it, not where the publisher says.
    cloud = scene.running.app.settings.atlas_cloud_exchange
    others = await scene.client.bind_observer(cloud, "acme.summary")  # another tenant's Atlas Cloud traffic
    retries = {"CC": ["acme.summary", "0", "1"], "BCC": ["acme.rca"], "cc": ["acme.summary"]}
    request = samples.request("nobyoc", request_id="fanned-out")

    await scene.client.publish_request(orjson.dumps(request), headers=retries)
    await scene.settled("fanned-out")

    left = await scene.leftovers()
    [rerouted] = left.cloud
    assert rerouted.headers[Header.REROUTED_FROM_TENANT] == "nobyoc"
    assert not {"CC", "BCC", "cc"} & set(rerouted.headers or {})
    assert await drain_now(others) == []  # routed at the same confirmed publish as the copy above

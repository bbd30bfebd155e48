"""Each fallback policy, end to end: the message is seen where it should be, and nowhere else."""

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from aio_pika.abc import AbstractQueue
from structlog.testing import capture_logs

from contracts import Header, Topology
from tests import samples
from tests.broker import BrokerClient, collect, drain_now, json_body
from tests.conftest import RunningWorker, start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI, Fault
from worker.handling.ladder import RetryLadder

pytestmark = pytest.mark.broker


class Observers:
    """Queues bound to every place a request can go besides the reply: retry ladder, Atlas Cloud, dead."""

    def __init__(self, retry: AbstractQueue, cloud: AbstractQueue, dead: AbstractQueue) -> None:
        self.retry, self.cloud, self.dead = retry, cloud, dead


@pytest.fixture
async def observers(client: BrokerClient, worker: RunningWorker, topology: Topology) -> Observers:
    retry = await client.channel.declare_queue("", exclusive=True)
    retry_exchange = await client.channel.get_exchange(topology.retry)
    for level in range(worker.app.settings.ladder.levels):
        await retry.bind(retry_exchange, str(level))
    cloud = await client.bind_observer(worker.app.settings.atlas_cloud_exchange)
    dead = await client.channel.get_queue(topology.dead)
    return Observers(retry, cloud, dead)


async def settle_quietly() -> None:
    await asyncio.sleep(0.5)  # long enough for a stray publish to show up on an observer queue


async def test_fail_closed_provider_down_replies_unavailable_and_nothing_else(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path, observers: Observers
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="fail_closed")
    worker.app.registry.refresh()
    fake_openai.always = Fault("server_error")
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme"), reply_to=replies.name)

    reply = json_body((await collect(replies, 1))[0])
    assert reply["status"] == "unavailable"
    assert reply["provenance"]["policy"] == "fail_closed"
    assert reply["provenance"]["fallback_used"] is True
    assert reply["provenance"]["data_left_network"] is False
    await settle_quietly()
    assert (await drain_now(observers.retry), await drain_now(observers.cloud), await drain_now(observers.dead)) == (
        [],
        [],
        [],
    )


async def test_fail_closed_bad_request_fails_and_is_dead_lettered(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path, observers: Observers
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="fail_closed")
    worker.app.registry.refresh()
    fake_openai.always = Fault("bad_request")
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme"), reply_to=replies.name)

    assert json_body((await collect(replies, 1))[0])["status"] == "failed"
    [dead] = await collect(observers.dead, 1)
    assert dead.headers[Header.REASON] == "permanent_error"
    assert dead.headers[Header.ERROR_CLASS] == "bad_request"
    await settle_quietly()
    assert await drain_now(observers.cloud) == []


async def test_queue_and_retry_recovers_on_the_ladder(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path, observers: Observers
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=5)
    worker.app.registry.refresh()
    fake_openai.faults.extend([Fault("server_error"), Fault("rate_limit")])
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme", request_id="ladder-1"), reply_to=replies.name)

    reply = json_body((await collect(replies, 1))[0])
    assert reply["status"] == "ok"
    assert reply["provenance"]["attempts"] == 3
    assert reply["provenance"]["fallback_used"] is True
    assert reply["provenance"]["policy"] == "queue_and_retry"
    parked = await drain_now(observers.retry)
    assert [m.routing_key for m in parked] == ["0", "1"]
    assert [m.headers[Header.ATTEMPTS] for m in parked] == [1, 2]
    assert all(json_body(m)["request_id"] == "ladder-1" for m in parked)
    await settle_quietly()
    assert (await drain_now(observers.cloud), await drain_now(observers.dead)) == ([], [])


async def test_queue_and_retry_exhausted_fails_and_dead_letters_with_operator_headers(
    client: BrokerClient,
    worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    observers: Observers,
    topology: Topology,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=3)
    worker.app.registry.refresh()
    fake_openai.always = Fault("server_error")
    replies = await client.reply_queue()
    body = samples.request("acme", request_id="exhaust-1")

    await client.publish_request(body, reply_to=replies.name)

    reply = json_body((await collect(replies, 1))[0])
    assert reply["status"] == "failed"
    assert reply["provenance"]["attempts"] == 3
    [dead] = await collect(observers.dead, 1)
    assert json_body(dead) == body
    headers = dead.headers
    assert headers[Header.REASON] == "exhausted"
    assert headers[Header.ATTEMPTS] == 3
    assert headers[Header.TENANT_ID] == "acme"
    assert headers[Header.REQUEST_ID] == "exhaust-1"
    assert headers[Header.TASK] == "summary"
    assert headers[Header.ERROR_CODE] == "provider_unavailable"
    assert headers[Header.PROVIDER_KIND] == "openai_compatible"
    assert headers[Header.ORIGINAL_EXCHANGE] == topology.requests
    assert headers[Header.ORIGINAL_ROUTING_KEY] == "request"
    assert str(headers[Header.FIRST_FAILURE_AT]) <= str(headers[Header.LAST_FAILURE_AT])
    assert "sk-test-fake" not in orjson.dumps({k: str(v) for k, v in headers.items()}).decode()
    assert len(await drain_now(observers.retry)) == 2
    assert await drain_now(observers.cloud) == []


async def test_queue_and_retry_auth_error_is_not_retried(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path, observers: Observers
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", api_key="env:WRONG_KEY")
    worker.app.registry.refresh()
    replies = await client.reply_queue()

    with pytest.MonkeyPatch.context() as env:
        env.setenv("WRONG_KEY", "sk-wrong")
        await client.publish_request(samples.request("acme"), reply_to=replies.name)
        reply = json_body((await collect(replies, 1))[0])

    assert reply["status"] == "failed"
    assert reply["error"]["error_class"] == "auth"
    assert "check the API key" in reply["error"]["message"]
    assert "sk-wrong" not in orjson.dumps(reply).decode()
    [dead] = await collect(observers.dead, 1)
    assert dead.headers[Header.REASON] == "permanent_error"
    assert await drain_now(observers.retry) == []


async def test_queue_and_retry_never_schedules_past_the_deadline(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path, observers: Observers
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=10)
    worker.app.registry.refresh()
    fake_openai.always = Fault("server_error")
    replies = await client.reply_queue()
    deadline = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()

    await client.publish_request(samples.request("acme", deadline=deadline), reply_to=replies.name)

    reply = json_body((await collect(replies, 1))[0])
    assert reply["status"] == "expired"
    [dead] = await collect(observers.dead, 1)
    assert dead.headers[Header.REASON] == "expired"
    # Ladder here: 0.2, 0.4, 0.8 s… only levels that come back before the deadline were used.
    assert len(await drain_now(observers.retry)) <= 3


async def test_atlas_cloud_reroutes_the_original_body_and_audits_it(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path, observers: Observers
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="atlas_cloud")
    worker.app.registry.refresh()
    fake_openai.always = Fault("server_error")
    replies = await client.reply_queue()
    raw = orjson.dumps(samples.request("acme", "rca", request_id="to-cloud"))

    with capture_logs() as logs:
        await client.publish_request(raw, reply_to=replies.name, correlation_id="c1")
        [rerouted] = await collect(observers.cloud, 1)

    assert rerouted.body == raw
    assert rerouted.reply_to == replies.name
    assert rerouted.correlation_id == "c1"
    assert rerouted.headers[Header.REROUTED_FROM_TENANT] == "acme"
    assert rerouted.headers[Header.REASON] == "transient"
    audit = [e for e in logs if e["event"] == "data_left_network"]
    assert len(audit) == 1
    assert audit[0]["tenant_id"] == "acme"
    assert audit[0]["reason"] == "transient"
    await settle_quietly()
    assert (await drain_now(replies), await drain_now(observers.retry), await drain_now(observers.dead)) == ([], [], [])


async def test_atlas_cloud_does_not_reroute_what_the_provider_rejected_as_wrong(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path, observers: Observers
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="atlas_cloud")
    worker.app.registry.refresh()
    fake_openai.always = Fault("context_overflow")
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme"), reply_to=replies.name)

    reply = json_body((await collect(replies, 1))[0])
    assert reply["status"] == "failed"
    assert reply["error"]["error_class"] == "context_overflow"
    await settle_quietly()
    assert await drain_now(observers.cloud) == []


async def test_a_parked_retry_returns_after_its_level_ttl_not_before(
    amqp_url: str, client: BrokerClient, fake_openai: FakeOpenAI, tenants_dir: Path, topology: Topology
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry")
    ladder = RetryLadder(base_s=1.0, factor=2.0, levels=3)
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir, ladder=ladder))
    try:
        fake_openai.faults.extend([Fault("server_error"), Fault("server_error")])
        replies = await client.reply_queue()
        await client.publish_request(samples.request("acme"), reply_to=replies.name)
        assert json_body((await collect(replies, 1))[0])["status"] == "ok"
    finally:
        await running.stop()

    first, second, third = fake_openai.request_times
    assert second - first >= 1.0  # level 0 holds a message for 1 s
    assert third - second >= 2.0  # level 1 for 2 s


@pytest.mark.parametrize(
    ("policy", "fault", "api_key", "expected"),
    [
        ("fail_closed", Fault("quota"), "env:TEST_FAKE_OPENAI_KEY", "unavailable"),
        ("fail_closed", None, "env:NOT_THE_KEY", "unavailable"),
        ("queue_and_retry", Fault("quota"), "env:TEST_FAKE_OPENAI_KEY", "failed"),
        ("atlas_cloud", Fault("quota"), "env:TEST_FAKE_OPENAI_KEY", "rerouted"),
        ("atlas_cloud", None, "env:NOT_THE_KEY", "rerouted"),
        ("atlas_cloud", Fault("bad_request"), "env:TEST_FAKE_OPENAI_KEY", "failed"),
    ],
)
async def test_misconfigured_provider_rows(
    client: BrokerClient,
    worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    observers: Observers,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    fault: Fault | None,
    api_key: str,
    expected: str,
) -> None:
    monkeypatch.setenv("NOT_THE_KEY", "sk-wrong-key")
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy=policy, api_key=api_key)
    worker.app.registry.refresh()
    fake_openai.always = fault
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme"), reply_to=replies.name)

    if expected == "rerouted":
        [rerouted] = await collect(observers.cloud, 1)
        assert rerouted.headers[Header.REROUTED_FROM_TENANT] == "acme"
        await settle_quietly()
        assert await drain_now(replies) == []
    else:
        assert json_body((await collect(replies, 1))[0])["status"] == expected
        await settle_quietly()
        assert await drain_now(observers.cloud) == []
    assert await drain_now(observers.retry) == []

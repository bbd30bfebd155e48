"""An operator's view of a running worker: counters move on /metrics, /readyz follows the worker's state."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contracts import Topology
from tests import samples
from tests.broker import BrokerClient, collect
from tests.conftest import RunningWorker, start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.ops.scrape import free_port, get_json, scrape, scrape_until
from worker.providers.breaker import BreakerPolicy

pytestmark = pytest.mark.broker


@pytest.fixture
async def broken_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(always=Fault("server_error"))
    await fake.start()
    yield fake
    await fake.close()


async def test_metrics_count_success_retry_reroute_and_dead_letter_by_tenant(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    broken_openai: FakeOpenAI,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="fail_closed")
    write_tenant(tenants_dir, "closed", broken_openai.base_url, policy="fail_closed")
    write_tenant(tenants_dir, "retrier", broken_openai.base_url, policy="queue_and_retry", max_attempts=2)
    write_tenant(tenants_dir, "cloudy", broken_openai.base_url, policy="atlas_cloud")
    port = free_port()
    settings = worker_settings(amqp_url, topology, tenants_dir, metrics_port=port)
    cloud = await client.bind_observer(settings.atlas_cloud_exchange)
    running = await start_worker(settings)
    try:
        before = await scrape(port)
        assert before.value("atlas_worker_settled_total") == 0
        assert before.value("atlas_worker_consuming") == 1
        assert before.value("atlas_worker_ready") == 1
        assert before.value("atlas_worker_tenants_loaded") == 4

        for tenant in ("acme", "closed", "retrier", "cloudy", "stranger"):
            await client.publish_request(samples.request(tenant, "summary"))

        # acme, closed, cloudy and stranger settle once; retrier twice (a retry, then exhausted).
        after = await scrape_until(port, lambda s: s.value("atlas_worker_settled_total") >= 6)
        await collect(cloud, 2)
    finally:
        await running.stop()

    settled = "atlas_worker_settled_total"
    assert after.value(settled) == 6
    assert after.value(settled, result="replied", status="ok", task="summary", tenant="acme") == 1
    assert after.value(settled, result="replied", status="unavailable", tenant="closed") == 1
    assert after.value(settled, result="retried", tenant="retrier", provider_kind="openai_compatible") == 1
    assert after.value(settled, result="replied+dead_lettered", status="failed", tenant="retrier") == 1
    assert after.value(settled, result="rerouted") == 2
    assert after.value("atlas_worker_retries_total", level="0", tenant="retrier") == 1
    assert after.value("atlas_worker_dead_letters_total", reason="exhausted", tenant="retrier") == 1
    assert after.value("atlas_worker_reroutes_total", reason="transient", tenant="cloudy") == 1
    # A tenant without a configuration file never becomes a label value of its own.
    assert after.value("atlas_worker_reroutes_total", reason="no_byoc_config", tenant="other") == 1
    assert "stranger" not in after.label_values("tenant")
    assert after.value("atlas_worker_tokens_total", direction="input", tenant="acme") > 0
    assert after.value("atlas_worker_tokens_total", direction="output", provider_kind="openai_compatible") > 0
    assert after.value("atlas_worker_tokens_total", tenant="closed") == 0
    # Latency is read from replies: acme's answer, closed's unavailable and retrier's final failure.
    assert after.value("atlas_worker_provider_latency_seconds_count", provider_kind="openai_compatible") == 3
    assert after.value("atlas_worker_in_flight") == 0
    assert after.value("atlas_worker_unroutable_total") == 0
    assert "sk-test-fake" not in after.text


async def test_readyz_turns_false_while_draining_and_healthz_stays_up(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path, fake_openai: FakeOpenAI
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, timeout_s=30)
    fake_openai.latency_s = 4  # the call outlives the drain grace, so draining lasts `grace_s`
    port = free_port()
    running: RunningWorker = await start_worker(
        worker_settings(amqp_url, topology, tenants_dir, metrics_port=port, grace_s=1.0)
    )
    status, body = await get_json(port, "/readyz")
    assert (status, body["ready"]) == (200, True)
    assert all(body["checks"].values())

    await client.publish_request(samples.request("acme", "summary"))
    await scrape_until(port, lambda s: s.value("atlas_worker_in_flight") == 1)
    running.app.stop()

    while True:
        status, body = await get_json(port, "/readyz")
        if status == 503:
            break
        await asyncio.sleep(0.02)
    assert body["ready"] is False
    assert body["checks"]["not_draining"] is False
    assert await get_json(port, "/healthz") == (200, {"status": "alive"})
    draining = await scrape(port)
    assert draining.value("atlas_worker_ready") == 0
    assert draining.value("atlas_worker_consuming") == 0

    await asyncio.wait_for(running.task, 30)


async def test_breaker_opening_shows_on_the_breaker_gauge(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path, broken_openai: FakeOpenAI
) -> None:
    write_tenant(tenants_dir, "acme", broken_openai.base_url, policy="fail_closed")
    port = free_port()
    running = await start_worker(
        worker_settings(amqp_url, topology, tenants_dir, metrics_port=port, breaker=BreakerPolicy(min_calls=1))
    )
    try:
        await client.publish_request(samples.request("acme", "summary"))
        after = await scrape_until(port, lambda s: s.value("atlas_worker_breaker_state", state="open") == 1)
    finally:
        await running.stop()

    assert after.value("atlas_worker_breaker_state", tenant="acme", state="closed") == 0
    assert after.value("atlas_worker_breaker_state", tenant="acme", state="half_open") == 0


async def test_breaker_gauge_turns_half_open_when_the_cooldown_passes_without_traffic(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path, broken_openai: FakeOpenAI
) -> None:
    write_tenant(tenants_dir, "acme", broken_openai.base_url, policy="fail_closed")
    port = free_port()
    policy = BreakerPolicy(min_calls=1, cooldown_s=1.0)
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir, metrics_port=port, breaker=policy))
    try:
        await client.publish_request(samples.request("acme", "summary"))
        await scrape_until(port, lambda s: s.value("atlas_worker_breaker_state", state="open") == 1)
        # No request arrives after the one that opened it: the gauge still shows what the next would meet.
        later = await scrape_until(port, lambda s: s.value("atlas_worker_breaker_state", state="half_open") == 1)
    finally:
        await running.stop()

    assert later.value("atlas_worker_breaker_state", tenant="acme", state="open") == 0
    assert len(broken_openai.requests) == 1


async def test_a_malformed_message_with_no_one_to_answer_counts_as_dead_lettered_only(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path
) -> None:
    port = free_port()
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir, metrics_port=port))
    try:
        dead = await client.channel.get_queue(topology.dead)
        await client.publish_request(b"{not json")  # no reply_to, and no tenant to route a reply by
        await collect(dead, 1)
        after = await scrape_until(port, lambda s: s.value("atlas_worker_settled_total") >= 1)
    finally:
        await running.stop()

    settled = "atlas_worker_settled_total"
    assert after.value(settled) == 1
    assert after.value(settled, result="dead_lettered") == 1
    assert after.value(settled, result="replied+dead_lettered") == 0
    assert after.value("atlas_worker_dead_letters_total", reason="malformed") == 1
    assert after.value("atlas_worker_unroutable_total") == 0

"""A tenant whose provider hangs cannot starve others; parked retries survive a kill -9; breakers open."""

import asyncio
import contextlib
import logging
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from contracts import Header, Topology
from tests import samples
from tests.broker import BrokerClient, collect, drain_now, json_body
from tests.conftest import start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.integration.test_process_lifecycle import wait_until
from tests.process import WorkerProcess
from worker.log import configure_logging
from worker.providers.breaker import BreakerPolicy

pytestmark = pytest.mark.broker


@contextlib.contextmanager
def info_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture log events down to `info`, with their request context (tests log warnings, uncaptured)."""
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        configure_logging("warning", cache=False)


async def queue_depth(client: BrokerClient, name: str) -> int:
    queue = await client.channel.declare_queue(name, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


async def test_hanging_tenant_does_not_starve_a_healthy_one(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path
) -> None:
    hanging, healthy = FakeOpenAI(), FakeOpenAI()
    await hanging.start()
    await healthy.start()
    hanging.always = Fault("hang")
    write_tenant(tenants_dir, "flood", hanging.base_url, policy="fail_closed", timeout_s=2, max_concurrency=4)
    write_tenant(tenants_dir, "calm", healthy.base_url, policy="fail_closed")
    settings = worker_settings(amqp_url, topology, tenants_dir)
    running = await start_worker(settings)
    replies = await client.reply_queue()
    try:
        for n in range(200):
            await client.publish_request(samples.request("flood", request_id=f"flood-{n}"), reply_to=replies.name)
        for n in range(10):
            await client.publish_request(samples.request("calm", request_id=f"calm-{n}"), reply_to=replies.name)

        received = [json_body(m) for m in await collect(replies, 10, timeout_s=60)]
        while sum(r["tenant_id"] == "calm" for r in received) < 10:
            received += [json_body(m) for m in await collect(replies, 1, timeout_s=60)]

        flood_done = [r for r in received if r["tenant_id"] == "flood"]
        assert len(flood_done) <= 20, "the healthy tenant waited behind the hanging one"
        assert all(r["provenance"]["attempts"] == 1 for r in flood_done)  # deferrals are not attempts
    finally:
        await running.stop()
        await hanging.close()
        await healthy.close()

    # Nothing of the flood was lost: what was not answered is back on the broker.
    # Deferred copies come back from the 0.2 s delay level: counted once they are all back on the request queue.
    levels = [topology.retry_queue(level) for level in range(settings.ladder.levels)]
    for _ in range(200):  # bounded
        if sum([await queue_depth(client, name) for name in levels]) == 0:
            break
        await asyncio.sleep(0.05)
    remaining = await queue_depth(client, topology.requests)
    for name in levels:
        remaining += await queue_depth(client, name)
    late = [json_body(m) for m in await drain_now(replies)]
    flood_replied = {r["request_id"] for r in received + late if r["tenant_id"] == "flood"}
    assert len(flood_replied) + remaining == 200
    # Never more than max_concurrency calls at once: every call but the (at most 4) cut short by the stop
    # ended in a reply. Counted once the worker stopped, so no reply is still on its way.
    assert len(hanging.requests) <= 4 + len(flood_replied)


async def test_parked_retries_survive_a_kill_9_and_finish(
    amqp_url: str,
    client: BrokerClient,
    fake_openai: FakeOpenAI,
    topology: Topology,
    tenants_dir: Path,
    tmp_path: Path,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=5)
    fake_openai.faults.extend(Fault("server_error") for _ in range(10))
    process = WorkerProcess(amqp_url, topology, tenants_dir, tmp_path / "w.log", "--retry-base", "3")
    await asyncio.to_thread(process.start)
    try:
        replies = await client.reply_queue()
        for n in range(10):
            await client.publish_request(samples.request("acme", request_id=f"parked-{n}"), reply_to=replies.name)
        await wait_until(lambda: len(fake_openai.requests) == 10)
        parked_queue = topology.retry_queue(0)

        async def all_parked() -> bool:
            return await queue_depth(client, parked_queue) == 10

        for _ in range(100):
            if await all_parked():
                break
            await asyncio.sleep(0.05)
        assert await all_parked()
        # Let the acks of the original deliveries reach the broker: a kill before that would have them
        # delivered again (at-least-once), and this test is about the parked copies.
        await asyncio.sleep(0.5)

        process.kill()
        await asyncio.to_thread(process.start)

        answered = [json_body(m) for m in await collect(replies, 10, timeout_s=60)]
        assert {r["request_id"] for r in answered} == {f"parked-{n}" for n in range(10)}
        assert {r["status"] for r in answered} == {"ok"}
        assert {r["provenance"]["attempts"] for r in answered} == {2}
    finally:
        process.stop()


async def test_open_breaker_applies_the_policy_without_calling_the_provider(
    amqp_url: str, client: BrokerClient, fake_openai: FakeOpenAI, topology: Topology, tenants_dir: Path
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="fail_closed", max_concurrency=1)
    fake_openai.always = Fault("server_error")
    running = await start_worker(
        worker_settings(amqp_url, topology, tenants_dir, breaker=BreakerPolicy(min_calls=3, cooldown_s=60))
    )
    try:
        replies = await client.reply_queue()
        for n in range(8):
            await client.publish_request(samples.request("acme", request_id=f"b-{n}"), reply_to=replies.name)
        answered = [json_body(m) for m in await collect(replies, 8, timeout_s=30)]
    finally:
        await running.stop()

    assert {r["status"] for r in answered} == {"unavailable"}
    codes = [r["error"]["code"] for r in answered]
    assert codes.count("provider_unavailable") == 3
    assert codes.count("circuit_open") == 5
    assert len(fake_openai.requests) == 3
    [(key, state)] = running.app.breakers.states().items()
    assert key == ("acme", fake_openai.base_url)
    assert state == "open"


async def test_an_open_circuit_costs_queue_and_retry_requests_no_attempt(
    amqp_url: str, client: BrokerClient, fake_openai: FakeOpenAI, topology: Topology, tenants_dir: Path
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=4, max_concurrency=1)
    fake_openai.faults.extend([Fault("server_error"), Fault("server_error")])
    running = await start_worker(
        worker_settings(amqp_url, topology, tenants_dir, breaker=BreakerPolicy(min_calls=1, cooldown_s=0.5, probes=1))
    )
    try:
        replies = await client.reply_queue()
        for n in range(6):
            await client.publish_request(samples.request("acme", request_id=f"cb-{n}"), reply_to=replies.name)
        answered = [json_body(m) for m in await collect(replies, 6, timeout_s=60)]
    finally:
        await running.stop()

    # The provider failed twice and then recovered. Requests that met the open circuit waited for its probes
    # without spending an attempt (patience 1.4 s on the ladder, longer than the 0.5 s cooldown), so none
    # ran out although five of six met the circuit open, one of them twice after a failed probe.
    assert {r["status"] for r in answered} == {"ok"}, [
        (r["status"], r["provenance"]["attempts"], (r.get("error") or {}).get("code")) for r in answered
    ]
    assert len(fake_openai.requests) == 6 + 2
    # Attempts count provider calls only, so together they are the calls the provider saw.
    assert sum(r["provenance"]["attempts"] for r in answered) == len(fake_openai.requests)
    assert sum(1 for r in answered if r["provenance"]["settle_seq"] > 0) >= 5  # put back on the ladder


async def test_a_circuit_that_outlasts_a_request_keeps_the_real_error_and_says_why_retrying_stopped(
    amqp_url: str, client: BrokerClient, fake_openai: FakeOpenAI, topology: Topology, tenants_dir: Path
) -> None:
    # Patience 0.2 + 0.4 + 0.8 + 1.6 = 3 s on the ladder for 5 attempts; the circuit stays open 60 s.
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=5, max_concurrency=1)
    fake_openai.faults.append(Fault("server_error"))
    with info_logs() as logs:
        running = await start_worker(
            worker_settings(amqp_url, topology, tenants_dir, breaker=BreakerPolicy(min_calls=1, cooldown_s=60))
        )
        try:
            dead = await client.channel.get_queue(topology.dead)
            replies = await client.reply_queue()
            await client.publish_request(samples.request("acme", request_id="first"), reply_to=replies.name)
            [first] = [json_body(m) for m in await collect(replies, 1, timeout_s=30)]
            soon = (datetime.now(UTC) + timedelta(seconds=20)).isoformat()
            dated = samples.request("acme", request_id="dated", deadline=soon)
            await client.publish_request(dated, reply_to=replies.name)
            await client.publish_request(samples.request("acme", request_id="undated"), reply_to=replies.name)
            answered = {r["request_id"]: r for r in [json_body(m) for m in await collect(replies, 2, timeout_s=30)]}
            dead_letters = {m.headers["atlas-request-id"]: m.headers for m in await collect(dead, 3, timeout_s=30)}
        finally:
            await running.stop()

    # The one real call is `provider_failed`; each refusal is `circuit_refused`, naming the endpoint.
    assert [e["request_id"] for e in logs if e["event"] == "provider_failed"] == ["first"]
    refused = [e for e in logs if e["event"] == "circuit_refused"]
    assert sorted(e["request_id"] for e in refused) == ["dated", "first", "undated"]
    assert {e["endpoint"] for e in refused} == {fake_openai.base_url}
    [retried] = [e for e in logs if e["event"] == "request_settled" and e["outcome"] == "retried"]
    assert retried["error_code"] == "provider_unavailable"
    assert datetime.fromisoformat(retried["next_attempt_at"]) > datetime.now(UTC) - timedelta(seconds=30)

    [warning] = [e for e in logs if e["event"] == "patience_shorter_than_cooldown"]
    assert (warning["tenant_id"], warning["patience_s"], warning["breaker_cooldown_s"]) == ("acme", 3.0, 60)
    assert len(fake_openai.requests) == 1  # only the first call reached the provider
    # The request whose call failed met the circuit it opened on its retry: the provider's real error leads
    # its final error, and `stopped_because` says the circuit ended the retrying, after one real attempt.
    assert first["status"] == "failed"
    assert first["provenance"]["attempts"] == 1
    assert first["error"]["code"] == "provider_unavailable"
    assert first["error"]["stopped_because"] == "circuit_open"
    assert "past the time its attempts could take" in first["error"]["message"]
    assert first["error"]["last_provider_error"]["code"] == "provider_unavailable"
    assert dead_letters["first"][Header.REASON] == "circuit_open"
    assert dead_letters["first"][Header.ERROR_CODE] == "provider_unavailable"
    assert dead_letters["first"][Header.LAST_PROVIDER_ERROR_CODE] == "provider_unavailable"
    assert dead_letters["first"][Header.ATTEMPTS] == 1
    # Its story, in the reply and in the dead letter: one real call parked on level 0, then one refusal.
    story = [(h["code"], h["provider_called"], h.get("level")) for h in first["provenance"]["history"]]
    assert story == [("provider_unavailable", True, 0), ("circuit_open", False, None)]
    assert orjson.loads(str(dead_letters["first"][Header.HISTORY])) == first["provenance"]["history"]
    [called] = first["provenance"]["history"][:1]
    assert datetime.fromisoformat(called["next_attempt_at"]) > datetime.fromisoformat(called["at"])
    # A request with a deadline before the next probe expires; one without has its patience as a bound.
    assert answered["dated"]["status"] == "expired"
    assert "past the request's deadline" in answered["dated"]["error"]["message"]
    assert dead_letters["dated"][Header.REASON] == "expired"
    assert answered["undated"]["status"] == "failed"
    assert answered["undated"]["error"]["code"] == "circuit_open"  # it never reached the provider
    assert answered["undated"]["error"]["stopped_because"] == "circuit_open"
    assert "last_provider_error" not in answered["undated"]["error"]
    assert answered["dated"]["error"]["stopped_because"] == "deadline"
    assert {r["provenance"]["attempts"] for r in answered.values()} == {0}


async def test_one_tenants_always_failing_requests_do_not_open_the_circuit_for_its_healthy_ones(
    amqp_url: str, client: BrokerClient, fake_openai: FakeOpenAI, topology: Topology, tenants_dir: Path
) -> None:
    # A third of the requests fail on every call and are retried four times; counted per call that is
    # 50 failed calls against 20 successes (counted per call, a breaker opens here), per request 10 of 30.
    write_tenant(tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", max_attempts=5)
    fake_openai.fault_for = lambda body: Fault("server_error") if b"[doomed]" in orjson.dumps(body) else None
    running = await start_worker(
        worker_settings(amqp_url, topology, tenants_dir, breaker=BreakerPolicy(min_calls=5, cooldown_s=60))
    )
    try:
        replies = await client.reply_queue()
        for n in range(30):
            body = samples.request("acme", request_id=f"k-{n}")
            if n % 3 == 0:
                body["incident"]["title"] += " [doomed]"
            await client.publish_request(body, reply_to=replies.name)
        answered = [json_body(m) for m in await collect(replies, 30, timeout_s=60)]
    finally:
        await running.stop()

    outcomes = {(r["request_id"], r["status"], (r.get("error") or {}).get("code")) for r in answered}
    assert {o for o in outcomes if o[1] != "ok"} == {
        (f"k-{n}", "failed", "provider_unavailable") for n in range(0, 30, 3)
    }
    assert running.app.breakers.states() == {("acme", fake_openai.base_url): "closed"}

"""The worker as a process: kill -9 loses nothing, SIGTERM drains, a cut connection recovers."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contracts import Topology
from tests import samples
from tests.broker import BrokerClient, collect, json_body
from tests.conftest import start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.tcp_proxy import TcpProxy
from tests.process import WorkerProcess

pytestmark = pytest.mark.broker


@pytest.fixture
async def worker_process(
    amqp_url: str, topology: Topology, tenants_dir: Path, tmp_path: Path
) -> AsyncIterator[WorkerProcess]:
    process = WorkerProcess(amqp_url, topology, tenants_dir, tmp_path / "worker.log", "--grace", "10")
    yield process
    process.stop()


async def wait_until(condition: "object", timeout_s: float = 20) -> None:
    for _ in range(int(timeout_s * 20)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_kill_9_with_requests_in_flight_loses_nothing(
    client: BrokerClient, fake_openai: FakeOpenAI, tenants_dir: Path, worker_process: WorkerProcess
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, max_concurrency=100, timeout_s=30)
    fake_openai.latency_s = 1.5
    await asyncio.to_thread(worker_process.start)
    replies = await client.reply_queue()
    ids = [f"k9-{n}" for n in range(40)]
    for request_id in ids:
        await client.publish_request(samples.request("acme", request_id=request_id), reply_to=replies.name)

    await wait_until(lambda: len(fake_openai.requests) >= 20)
    worker_process.kill()
    fake_openai.latency_s = 0.0
    await asyncio.to_thread(worker_process.start)

    answered = {json_body(m)["request_id"] for m in await collect(replies, len(ids), timeout_s=60)}
    assert answered == set(ids)


async def test_sigterm_lets_in_flight_calls_finish_then_exits(
    client: BrokerClient, fake_openai: FakeOpenAI, tenants_dir: Path, worker_process: WorkerProcess
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    fake_openai.latency_s = 1.0
    await asyncio.to_thread(worker_process.start)
    replies = await client.reply_queue()
    for n in range(5):
        await client.publish_request(samples.request("acme", request_id=f"drain-{n}"), reply_to=replies.name)
    await wait_until(lambda: len(fake_openai.requests) == 5)

    exit_code = await asyncio.to_thread(worker_process.terminate)

    assert exit_code == 0
    answered = {json_body(m)["request_id"] for m in await collect(replies, 5)}
    assert answered == {f"drain-{n}" for n in range(5)}
    assert '"worker_stopped"' in worker_process.log()
    assert "sk-test-fake" not in worker_process.log()  # the tenant's resolved API key is never logged


async def test_sigterm_returns_unfinished_work_to_the_queue_after_the_grace_period(
    amqp_url: str,
    client: BrokerClient,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    topology: Topology,
    tmp_path: Path,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, timeout_s=60)
    fake_openai.latency_s = 30
    process = WorkerProcess(amqp_url, topology, tenants_dir, tmp_path / "w.log", "--grace", "0.5")
    await asyncio.to_thread(process.start)
    try:
        for n in range(3):
            await client.publish_request(samples.request("acme", request_id=f"slow-{n}"))
        await wait_until(lambda: len(fake_openai.requests) == 3)

        assert await asyncio.to_thread(process.terminate) == 0
    finally:
        process.stop()

    queue = await client.channel.declare_queue(topology.requests, passive=True)
    assert queue.declaration_result.message_count == 3
    assert '"returned_to_queue": 3' in process.log().replace('"returned_to_queue":3', '"returned_to_queue": 3')


async def test_cut_broker_connection_recovers_and_every_request_is_answered(
    amqp_url: str, client: BrokerClient, fake_openai: FakeOpenAI, tenants_dir: Path, topology: Topology
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, max_concurrency=100)
    fake_openai.latency_s = 0.3
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    proxied_url = amqp_url.replace(":5672", f":{proxy.port}")
    running = await start_worker(worker_settings(proxied_url, topology, tenants_dir))
    try:
        replies = await client.reply_queue()
        ids = [f"cut-{n}" for n in range(60)]
        for request_id in ids[:30]:
            await client.publish_request(samples.request("acme", request_id=request_id), reply_to=replies.name)
        await wait_until(lambda: len(fake_openai.requests) >= 10)

        proxy.cut()
        for request_id in ids[30:]:
            await client.publish_request(samples.request("acme", request_id=request_id), reply_to=replies.name)

        # Deliveries unacked at the cut come again, so a request may be answered twice; none may go unanswered.
        answered: set[str] = set()
        async with asyncio.timeout(90):
            while not answered >= set(ids):
                answered.update(json_body(m)["request_id"] for m in await collect(replies, 1, timeout_s=90))
        assert answered == set(ids)
    finally:
        await running.stop()
        await proxy.close()

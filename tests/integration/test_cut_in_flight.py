"""A broker connection cut under in-flight provider calls: every request is answered, and only once."""

import asyncio
from pathlib import Path

import pytest

from contracts import Topology
from tests import samples
from tests.broker import BrokerClient, collect, drain_now, json_body
from tests.conftest import start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.tcp_proxy import TcpProxy
from tests.scene import until

pytestmark = pytest.mark.broker


async def test_calls_in_flight_across_a_cut_do_not_answer_a_second_time(
    amqp_url: str, client: BrokerClient, fake_openai: FakeOpenAI, tenants_dir: Path, topology: Topology
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, max_concurrency=100)
    fake_openai.latency_s = 6.0  # longer than the robust connection takes to reconnect
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    running = await start_worker(worker_settings(amqp_url.replace(":5672", f":{proxy.port}"), topology, tenants_dir))
    try:
        replies = await client.reply_queue()
        ids = [f"in-flight-{n}" for n in range(10)]
        for request_id in ids:
            await client.publish_request(samples.request("acme", request_id=request_id), reply_to=replies.name)
        for _ in range(200):  # bounded: until every call has reached the provider
            if len(fake_openai.requests) >= len(ids):
                break
            await asyncio.sleep(0.05)

        # The deliveries die with the connection and are delivered again once the worker has reconnected
        # (a few seconds); the calls made for the first deliveries still finish, after that.
        proxy.cut()
        for _ in range(600):  # bounded: until the redelivered requests have reached the provider too
            if len(fake_openai.requests) >= 2 * len(ids):
                break
            await asyncio.sleep(0.05)

        received = [json_body(m)["request_id"] for m in await collect(replies, len(ids), timeout_s=30)]
        # Every delivery's handling has ended, the lost ones' calls included (they outlive the cut by seconds):
        # whatever they could have published is on the queue by now.
        await until(lambda: running.app.consumer is not None and running.app.consumer.in_flight == 0, 30, "drained")
        late = [json_body(m)["request_id"] for m in await drain_now(replies)]
        assert sorted(received) == sorted(ids)
        assert late == [], "a call whose delivery was lost with the connection still published its reply"
    finally:
        await running.stop()
        await proxy.close()

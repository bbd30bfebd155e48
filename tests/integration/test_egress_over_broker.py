"""Stored tenants under the egress policy, seen from the reply queue: a capped answer, a refused redirect."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contracts import InferenceReply, Status, Topology
from tests import samples
from tests.broker import BrokerClient, collect
from tests.conftest import RunningWorker, running_worker, worker_settings, write_tenant
from tests.fakes.hostile_server import HostileServer, gzip_bomb, gzip_response, redirect
from tests.scene import tenants_reloaded

pytestmark = pytest.mark.broker
CAP = 64 * 1024


@pytest.fixture
async def capped_worker(amqp_url: str, topology: Topology, tenants_dir: Path) -> AsyncIterator[RunningWorker]:
    """The worker as `atlas-worker run --max-response-bytes 65536` starts it."""
    async with running_worker(worker_settings(amqp_url, topology, tenants_dir, max_response_bytes=CAP)) as running:
        yield running


@pytest.fixture
async def hostile() -> AsyncIterator[HostileServer]:
    server = await HostileServer().start()
    yield server
    await server.close()


async def ask(client: BrokerClient, tenant_id: str) -> InferenceReply:
    replies = await client.reply_queue()
    body = samples.request(tenant_id, "summary")
    await client.publish_request(body, reply_to=replies.name, correlation_id=body["request_id"])
    [message] = await collect(replies, 1, timeout_s=60)
    return InferenceReply.model_validate_json(message.body)


async def test_compressed_answer_inflating_past_the_cap_fails_as_too_large(
    client: BrokerClient, capped_worker: RunningWorker, hostile: HostileServer, tenants_dir: Path
) -> None:
    hostile.response = gzip_response(gzip_bomb())
    async with tenants_reloaded(capped_worker.app):
        write_tenant(tenants_dir, "acme", f"{hostile.url()}/v1")

    reply = await ask(client, "acme")

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "provider_response_too_large"
    assert f"{CAP} bytes" in reply.error.message
    assert len(hostile.hits) == 1  # not worth a retry: the same call gets the same answer


async def test_stored_tenant_redirect_is_an_error_naming_it_and_its_target_is_never_reached(
    client: BrokerClient, worker: RunningWorker, hostile: HostileServer, tenants_dir: Path
) -> None:
    target = await HostileServer(host="0.0.0.0").start()
    hostile.response = redirect(302, f"http://0.0.0.0:{target.port}/v1/chat/completions")
    async with tenants_reloaded(worker.app):
        write_tenant(tenants_dir, "acme", f"{hostile.url()}/v1")
    try:
        reply = await ask(client, "acme")
    finally:
        await target.close()

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "redirect_refused"
    assert f"http://0.0.0.0:{target.port}/v1/chat/completions" in reply.error.message
    assert target.hits == []

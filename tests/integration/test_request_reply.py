"""A request goes in, a reply comes out: the foundation's promises, observed on the broker."""

import asyncio
import time
import uuid
from pathlib import Path

import orjson
import pika  # a different client library, as another team's publisher would use
import pytest
from aio_pika.abc import AbstractIncomingMessage

from contracts import Header, InferenceReply, RcaResult, Status, Topology
from tests import samples
from tests.broker import BrokerClient, collect, drain_now, json_body
from tests.fakes.openai_server import Fault
from tests.scene import Scene

pytestmark = pytest.mark.broker


async def test_summary_request_gets_one_reply_with_same_correlation_id(scene: Scene) -> None:
    await scene.tenant("acme")
    body = samples.request("acme", "summary")

    await scene.send(body, correlation_id="corr-1")

    left = await scene.leftovers()
    [message] = left.replies  # one reply, and only one
    reply = InferenceReply.model_validate_json(message.body)
    assert message.correlation_id == "corr-1"
    assert reply.request_id == body["request_id"]
    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.text
    assert reply.provenance.provider_kind == "openai_compatible"
    assert reply.provenance.attempts == 1
    assert reply.provenance.fallback_used is False
    assert reply.usage.input_tokens > 0
    # The fake saw the tenant's key and model, resolved from env: and never echoed anywhere.
    assert scene.fake.requests[0]["model"] == "fake-model"
    assert b"sk-test-fake" not in message.body


async def test_time_waiting_for_a_busy_event_loop_counts_in_total_ms(scene: Scene) -> None:
    """`timings.total_ms` starts when the delivery reaches the worker, not when its task first runs: a delivery
    that waits behind other work on the loop has spent that time in the worker."""
    await scene.tenant("acme")
    consumer = scene.app.consumer
    assert consumer is not None
    arrived = consumer._on_delivery

    async def arrive_while_the_loop_is_busy(message: AbstractIncomingMessage) -> None:
        await arrived(message)  # the delivery's task is created, and has not run yet
        time.sleep(0.05)  # whatever else this turn of the loop does before it gets there

    await consumer.stop_consuming()
    consumer._on_delivery = arrive_while_the_loop_is_busy  # type: ignore[method-assign]
    await consumer.start()
    await scene.send(samples.request("acme", "summary"))

    [message] = (await scene.leftovers()).replies
    timings = InferenceReply.model_validate_json(message.body).timings
    assert timings.total_ms - timings.provider_ms >= 50


async def test_request_published_with_pika_is_answered(amqp_url: str, scene: Scene, topology: Topology) -> None:
    await scene.tenant("acme")
    replies = scene.replies
    body = samples.request("acme", "rca")

    def publish_with_pika() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                topology.requests,
                "request",
                orjson.dumps(body),
                pika.BasicProperties(
                    content_type="application/json", reply_to=replies.name, correlation_id="pika-42", delivery_mode=2
                ),
            )
        finally:
            connection.close()

    await asyncio.to_thread(publish_with_pika)

    [message] = await collect(replies, 1)
    reply = InferenceReply.model_validate_json(message.body)
    assert message.correlation_id == "pika-42"
    assert reply.request_id == body["request_id"]
    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.rca is not None
    RcaResult.model_validate(reply.result.rca.model_dump())


async def test_reply_without_reply_to_goes_to_replies_queue_by_tenant_and_task(
    scene: Scene, topology: Topology
) -> None:
    await scene.tenant("acme")
    observer = await scene.client.bind_observer(topology.replies, "acme.summary")
    body = samples.request("acme", "summary")

    await scene.send(body, reply=False)

    [message] = await drain_now(observer)
    assert message.routing_key == "acme.summary"
    assert json_body(message)["request_id"] == body["request_id"]


async def test_malformed_message_is_dead_lettered_and_next_one_answered(scene: Scene) -> None:
    await scene.tenant("acme")
    replies = scene.replies

    await scene.client.publish_request(b"{not json", reply_to=replies.name, correlation_id="bad-1")
    await scene.client.publish_request(
        {"request_id": "r-unknown-task", "tenant_id": "acme", "task": "poem"},
        reply_to=replies.name,
        correlation_id="bad-2",
    )
    good = samples.request("acme", "summary")
    await scene.send(good, correlation_id="good")
    for _ in range(2):
        await scene.settled(None)

    left = await scene.leftovers()
    messages = {m.correlation_id: m for m in left.replies}
    assert len(left.replies) == 3
    assert json_body(messages["bad-1"])["status"] == "rejected"
    assert json_body(messages["bad-1"])["error"]["code"] == "invalid_json"
    assert json_body(messages["bad-2"])["status"] == "rejected"
    assert json_body(messages["bad-2"])["error"]["code"] == "unknown_task"
    assert json_body(messages["bad-2"])["request_id"] == "r-unknown-task"
    assert json_body(messages["good"])["status"] == "ok"

    dead_letters = left.dead
    assert len(dead_letters) == 2
    by_body = {m.body: m for m in dead_letters}
    assert by_body[b"{not json"].headers[Header.REASON] == "malformed"
    assert by_body[b"{not json"].headers[Header.ERROR_CODE] == "invalid_json"
    unknown = next(m for m in dead_letters if m.body != b"{not json")
    assert unknown.headers[Header.ERROR_CODE] == "unknown_task"
    assert "task" in str(unknown.headers[Header.ERROR_MESSAGE])


async def test_tenant_without_config_is_rerouted_to_atlas_cloud_unchanged(scene: Scene) -> None:
    raw = orjson.dumps(samples.request("globex", "rca"))

    await scene.send(raw, correlation_id="c-globex")

    left = await scene.leftovers()
    [message] = left.cloud
    assert message.body == raw
    assert message.reply_to == scene.replies.name
    assert message.correlation_id == "c-globex"
    assert message.headers[Header.REASON] == "no_byoc_config"
    assert message.headers[Header.REROUTED_FROM_TENANT] == "globex"
    assert left.replies == []


@pytest.mark.parametrize("exchange_deleted", [False, True], ids=["nothing-bound", "exchange-deleted"])
async def test_unroutable_reroute_is_dead_lettered_with_reason(
    amqp_url: str, client: BrokerClient, topology: Topology, tenants_dir: Path, exchange_deleted: bool
) -> None:
    from tests.conftest import start_worker, worker_settings

    exchange = f"{topology.namespace}.atlas-cloud"
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir, atlas_cloud_exchange=exchange))
    try:
        if exchange_deleted:
            # An operator deletes the exchange while the worker runs: the broker answers the publish by closing
            # the channel (404), not with a return. The request must not go round the queue until its delivery
            # limit.
            await client.channel.exchange_delete(exchange)
        # Otherwise the exchange exists but nothing is bound to it: the reroute is returned, never dropped.
        dead = await client.channel.get_queue(topology.dead)
        raw = orjson.dumps(samples.request("initech", "summary"))
        await client.publish_request(raw)
        [message] = await collect(dead, 1)
        assert message.body == raw
        assert message.headers[Header.REASON] == "reroute_unroutable"
    finally:
        await running.stop()


async def test_fail_closed_tenant_gets_unavailable_and_nothing_leaves(scene: Scene) -> None:
    await scene.tenant("acme", policy="fail_closed")
    scene.fake.always = Fault("server_error")

    await scene.send(samples.request("acme", "summary"))

    left = await scene.leftovers()
    [message] = left.replies
    reply = json_body(message)
    assert reply["status"] == "unavailable"
    assert reply["error"]["error_class"] == "transient"
    assert "503" in reply["error"]["message"]
    assert left.cloud == []


async def test_unique_request_ids_each_get_exactly_one_reply_under_concurrency(scene: Scene) -> None:
    await scene.tenant("acme", max_concurrency=64)
    scene.fake.latency_s = 0.05
    ids = [f"bulk-{uuid.uuid4().hex[:8]}" for _ in range(100)]

    for request_id in ids:
        body = samples.request("acme", "summary", request_id=request_id)
        await scene.client.publish_request(body, reply_to=scene.replies.name)
    for request_id in ids:
        await scene.settled(request_id, timeout_s=60)

    received = [json_body(m)["request_id"] for m in (await scene.leftovers()).replies]
    assert sorted(received) == sorted(ids)

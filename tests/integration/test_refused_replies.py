"""A reply the broker refuses (the caller's reply queue is full) is published again, never bought again."""

import asyncio
import uuid
from collections.abc import MutableMapping
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue
from structlog.testing import capture_logs

from contracts import Header, InferenceReply, Status
from tests import samples
from tests.broker import drain_now
from tests.scene import Scene

pytestmark = pytest.mark.broker


@pytest.fixture
async def full_reply_queue(scene: Scene) -> AbstractQueue:
    """A caller's reply queue that holds one message and refuses the next (`x-overflow: reject-publish`), full."""
    queue = await scene.client.channel.declare_queue(
        f"replies-full-{uuid.uuid4().hex[:8]}",
        exclusive=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await scene.client.channel.default_exchange.publish(
        aio_pika.Message(b"an earlier reply nobody has read yet"), queue.name
    )
    return queue


async def test_a_reply_refused_for_good_is_dead_lettered_after_one_provider_call(
    scene: Scene, full_reply_queue: AbstractQueue
) -> None:
    # Put back on the queue instead, the request would be answered again at each delivery, its provider called
    # (and paid for) every time until the delivery limit, and parked at last with no reason.
    await scene.tenant("acme")
    body = samples.request("acme", "summary")

    with capture_logs() as logs:
        await scene.client.publish_request(body, reply_to=full_reply_queue.name)
        await scene.settled(body["request_id"], timeout_s=30)

    left = await scene.leftovers()
    [dead] = left.dead
    assert dead.headers[Header.REASON] == "reply_unroutable"
    assert dead.headers[Header.ERROR_CODE] == "reply_rejected"
    assert full_reply_queue.name in str(dead.headers[Header.ERROR_MESSAGE])
    assert len(scene.fake.requests) == 1
    refusals = [e for e in logs if e["event"] == "reply_refused"]
    assert len(refusals) >= 2  # published again, not given up at the first refusal
    assert [m.body for m in await drain_now(full_reply_queue)] == [b"an earlier reply nobody has read yet"]


async def test_a_reply_queue_that_frees_up_gets_the_reply_without_a_second_provider_call(
    scene: Scene, full_reply_queue: AbstractQueue
) -> None:
    await scene.tenant("acme")
    body = samples.request("acme", "summary")

    refused = asyncio.Event()

    def watch(_: object, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event["event"] == "reply_refused":
            refused.set()
        return event

    with capture_logs(processors=[watch]):
        await scene.client.publish_request(body, reply_to=full_reply_queue.name)
        async with asyncio.timeout(30):  # the first refusal, then the caller catches up
            await refused.wait()
        assert [m.body for m in await drain_now(full_reply_queue)] == [b"an earlier reply nobody has read yet"]
        await scene.settled(body["request_id"], timeout_s=30)

    [message] = await drain_now(full_reply_queue)
    reply = InferenceReply.model_validate_json(message.body)
    assert reply.request_id == body["request_id"]
    assert reply.status is Status.OK
    assert len(scene.fake.requests) == 1
    assert (await scene.leftovers()).empty()

"""The publishing channel closed by the broker, and publishes the broker refuses: what each publish reports."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustChannel
from aio_pika.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity, DeliveryError

from contracts import Topology
from tests.broker import BrokerClient, collect, drain_now
from worker.broker.connection import connect_worker
from worker.broker.publish import PERSISTENT, Properties, publish

pytestmark = pytest.mark.broker


@pytest.fixture
async def channel(amqp_url: str, topology: Topology) -> AsyncIterator[AbstractRobustChannel]:
    """A publishing channel opened as the worker opens its own: robust, confirmed, unroutable publishes raised."""
    connection = await connect_worker(amqp_url, topology.namespace, 5)
    try:
        yield await connection.channel(publisher_confirms=True, on_return_raises=True)
    finally:
        await connection.close()


async def test_a_publish_right_after_the_broker_closed_the_channel_waits_for_it_to_reopen(
    channel: AbstractRobustChannel, client: BrokerClient, topology: Topology
) -> None:
    # A publish to an exchange that is gone (an operator deleted atlas.cloud) makes the broker close the
    # channel. The robust channel reopens by itself; the next settle's publish must not fail meanwhile (its
    # delivery would go back to the queue and the tenant's provider be called a second time).
    replies = await client.reply_queue()
    properties = Properties(message_id="reply-after-close", delivery_mode=PERSISTENT)
    with pytest.raises(ChannelNotFoundEntity):
        await publish(channel, f"{topology.namespace}.gone-{uuid.uuid4().hex[:6]}", "x", b"lost", properties, 5)

    await publish(channel, "", replies.name, b"answered", properties, 5)

    assert [m.body for m in await collect(replies, 1)] == [b"answered"]


async def test_a_publish_on_a_channel_the_worker_closed_fails_as_closed(channel: AbstractRobustChannel) -> None:
    # Closed for good (shutdown): it will not reopen, so the publish does not wait for it (that would end in
    # TimeoutError after `within_s`).
    await channel.close()
    with pytest.raises(ChannelInvalidStateError):
        await publish(channel, "", "anywhere", b"late", Properties(delivery_mode=PERSISTENT), 5)


async def test_a_refused_publish_while_the_channel_is_being_restored_does_not_break_it_for_good(
    channel: AbstractRobustChannel, client: BrokerClient, topology: Topology
) -> None:
    # A delivery put back after its publish closed the channel comes straight back and publishes again, to the
    # same deleted exchange, the moment the channel is open again: while aio-pika is still restoring it.
    replies = await client.reply_queue()
    gone = f"{topology.namespace}.gone-{uuid.uuid4().hex[:6]}"
    properties = Properties(delivery_mode=PERSISTENT)
    with pytest.raises(ChannelNotFoundEntity):
        await publish(channel, gone, "x", b"lost", properties, 5)
    async with asyncio.timeout(5):
        while channel.is_closed:  # noqa: ASYNC110 (aio-pika has no event for it): the first turn it is open again
            await asyncio.sleep(0)
    with pytest.raises(ChannelNotFoundEntity):
        await publish(channel, gone, "x", b"lost again", properties, 5)

    await publish(channel, "", replies.name, b"answered", properties, 5)  # every later settle publishes

    assert [m.body for m in await collect(replies, 1)] == [b"answered"]


async def test_a_publish_the_broker_nacks_fails_and_the_next_one_on_the_channel_is_confirmed(
    channel: AbstractRobustChannel, client: BrokerClient, topology: Topology
) -> None:
    # A full quorum queue that rejects publishes (x-overflow reject-publish) nacks: never taken for a confirm.
    full = await client.channel.declare_queue(
        f"{topology.namespace}.full-{uuid.uuid4().hex[:6]}",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
    )
    replies = await client.reply_queue()
    try:
        confirmed, refused = [], []
        for n in range(3):  # a quorum queue's limit is soft: it takes one more before it refuses
            body = f"m{n}".encode()
            try:
                await publish(channel, "", full.name, body, Properties(delivery_mode=PERSISTENT), 5)
                confirmed.append(body)
            except DeliveryError:
                refused.append(body)
        await publish(channel, "", replies.name, b"answered", Properties(delivery_mode=PERSISTENT), 5)

        assert refused, confirmed
        assert [m.body for m in await drain_now(full)] == confirmed  # a nacked publish is not on the queue
        assert [m.body for m in await collect(replies, 1)] == [b"answered"]
    finally:
        await full.delete(if_unused=False, if_empty=False)

"""A mandatory publish the broker returns fails that publish, even when another in flight has its message_id."""

import asyncio
import uuid

import pytest
from aio_pika.exceptions import PublishError

from contracts import Topology
from tests.broker import BrokerClient, collect
from tests.fakes.tcp_proxy import TcpProxy
from worker.broker.connection import connect_worker
from worker.broker.publish import PERSISTENT, Properties, publish


async def test_a_return_fails_the_publish_returned_not_another_with_the_same_message_id(
    amqp_url: str, topology: Topology
) -> None:
    # message_id is the publisher's (a copy keeps the request's; a reply's is derived from its request_id),
    # so two publishes in flight on the worker's channel can share one.
    connection = await connect_worker(amqp_url, topology.namespace, 5)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        routable = await channel.declare_queue(f"{topology.namespace}.returns-{uuid.uuid4().hex[:6]}", exclusive=True)
        shared = Properties(message_id="same-id", delivery_mode=PERSISTENT)
        unroutable = publish(channel, "", f"{topology.namespace}.nowhere", b"lost?", shared, 5)
        delivered = publish(channel, "", routable.name, b"kept", shared, 5)
        results = await asyncio.gather(unroutable, delivered, return_exceptions=True)
        assert isinstance(results[0], PublishError), results  # the returned one is reported unroutable
        assert results[1] is None, results  # and the routed one is confirmed
    finally:
        await connection.close()


async def test_a_late_return_of_a_timed_out_publish_does_not_fail_a_later_one_with_its_message_id(
    amqp_url: str, client: BrokerClient, topology: Topology
) -> None:
    # A slow link: the first publish (unroutable) gives up before the broker has seen it, and the delivery is
    # settled again with the same message_id. The broker then returns the first: that is not the second's return.
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    connection = await connect_worker(amqp_url.replace(":5672", f":{proxy.port}"), topology.namespace, 5)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        replies = await client.reply_queue()
        proxy.hold()
        with pytest.raises(TimeoutError):
            await publish(channel, "", f"{topology.namespace}.nowhere", b"given up", _shared(), 0.2)
        second = asyncio.ensure_future(publish(channel, "", replies.name, b"answered", _shared(), 10))
        await asyncio.sleep(0.1)  # the second publish is written too (behind the first, in the proxy)
        proxy.release()

        await second  # confirmed: the broker routed it
        assert [m.body for m in await collect(replies, 1)] == [b"answered"]
    finally:
        await connection.close()
        await proxy.close()


def _shared() -> Properties:
    return Properties(message_id="request-7", delivery_mode=PERSISTENT)

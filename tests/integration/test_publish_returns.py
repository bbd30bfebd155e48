"""A mandatory publish the broker returns fails that publish, even when another in flight has its message_id."""

import asyncio
import uuid

from aio_pika.exceptions import PublishError

from contracts import Topology
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

"""Acks for deliveries of a channel the connection has since lost never reach the channel that replaced it."""

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from contracts import Topology
from tests.broker import BrokerClient
from tests.fakes.tcp_proxy import TcpProxy
from worker.broker.acks import Acknowledger
from worker.broker.connection import connect_worker

pytestmark = pytest.mark.broker


async def test_a_stale_delivery_tag_does_not_ack_the_redelivery_that_took_it_on_the_new_channel(
    amqp_url: str, client: BrokerClient, topology: Topology
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    name = f"{topology.namespace}.stale-{uuid.uuid4().hex[:6]}"
    connection = await connect_worker(amqp_url.replace(":5672", f":{proxy.port}"), topology.namespace, 5)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=10)
        queue = await channel.declare_queue(name, durable=True)  # declared here: re-consumed after a reconnect
        deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(deliveries.put)
        await client.channel.default_exchange.publish(aio_pika.Message(b"the request"), name)
        first = await asyncio.wait_for(deliveries.get(), 10)

        proxy.cut()  # the delivery is still being handled; the broker will deliver it again
        again = await asyncio.wait_for(deliveries.get(), 30)
        assert again.redelivered
        assert again.delivery_tag == first.delivery_tag  # its old tag, on the new channel

        acks = Acknowledger()
        with pytest.raises(ChannelInvalidStateError):  # the first delivery's handling ends: too late to ack
            acks.ack(first)
        await acks.flush()
        await connection.close()  # the redelivery was never acked, so the broker keeps it

        kept = await client.channel.declare_queue(name, passive=True)
        assert kept.declaration_result.message_count == 1
    finally:
        await connection.close()
        await client.channel.queue_delete(name)
        await proxy.close()

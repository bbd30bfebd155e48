"""One confirmed, mandatory publish, handed straight to the AMQP channel with prebuilt properties.

aio-pika's `Exchange.publish` takes an `aio_pika.Message`, whose every attribute goes through a locking
`__setattr__` and whose properties are rebuilt on each publish; the worker already knows every property, so it
builds the `pamqp` properties once and publishes through the channel aio-pika itself would use. The robust
channel is asked for its current channel at each publish, so publishes follow it across reconnects.

The publish does not wait for aiormq's writer to hand the frames to the socket (`wait=False`): the confirm that
is awaited comes only after the broker has the message, and frames leave in the order they were queued, so
waiting for the write as well would only hold the channel's publish lock for one more loop turn per publish.
"""

from typing import Final, cast

import aiormq
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic

Properties = Basic.Properties
PERSISTENT: Final = 2  # AMQP delivery mode


async def publish(
    channel: AbstractChannel, exchange: str, routing_key: str, body: bytes, properties: Properties, within_s: float
) -> None:
    """Publish and wait for the broker's confirm. Raises PublishError when the broker returns it unroutable
    (the channel is opened with `on_return_raises`), DeliveryError on a nack, ChannelInvalidStateError when the
    channel is closed, TimeoutError when no confirm came within `within_s` seconds."""
    if channel.is_closed:
        raise ChannelInvalidStateError(f"{channel!r} closed")
    # aio-pika's channels are aiormq's `Channel`, whose `basic_publish` takes `wait` (the abstract one does not).
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    await underlay.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=True,
        timeout=within_s,
        wait=False,
    )

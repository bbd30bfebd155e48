"""One confirmed, mandatory publish, handed straight to the AMQP channel with prebuilt properties.

aio-pika's `Exchange.publish` takes an `aio_pika.Message`, whose every attribute goes through a locking
`__setattr__` and whose properties are rebuilt on each publish; the worker already knows every property, so it
builds the `pamqp` properties once and publishes through the channel aio-pika itself would use. The robust
channel is asked for its current channel at each publish, so publishes follow it across reconnects.

The publish does not wait for aiormq's writer to hand the frames to the socket (`wait=False`): the confirm that
is awaited comes only after the broker has the message, and frames leave in the order they were queued, so
waiting for the write as well would only hold the channel's publish lock for one more loop turn per publish.

aiormq finds the publish a `basic.return` belongs to by its message_id, the latest publish with that id winning.
The message_id is the publisher's (a copy keeps the request's, a reply's is made from its request_id), so two
publishes in flight could share one: the returned publish would then be confirmed, silently dropped, and the
other failed. A publish therefore waits for any publish in flight on its channel with the same message_id, and a
publish that timed out stays in flight until the broker has answered it.
"""

import asyncio
from typing import Final, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustChannel
from aio_pika.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic

Properties = Basic.Properties
PERSISTENT: Final = 2  # AMQP delivery mode
REOPEN_POLL_S: Final = 0.02
# How long a publish given up on keeps waiting for the broker's answer (and its message_id): far beyond the
# heartbeat timeout, after which a silent connection is closed and every confirmation it waits for fails.
ANSWER_WAIT_S: Final = 600.0

# Per underlying channel, the message_ids of the publishes in flight on it; a channel's entry goes with its last.
_in_flight: dict[aiormq.Channel, dict[str, asyncio.Event]] = {}


async def publish(
    channel: AbstractChannel, exchange: str, routing_key: str, body: bytes, properties: Properties, within_s: float
) -> None:
    """Publish and wait for the broker's confirm. Raises PublishError when the broker returns it unroutable
    (the channel is opened with `on_return_raises`), DeliveryError on a nack, ChannelInvalidStateError when the
    channel is closed, TimeoutError when no confirm came within `within_s` seconds (all waits below included)."""
    deadline = asyncio.get_running_loop().time() + within_s
    # aio-pika's channels are aiormq's `Channel`, whose `basic_publish` takes `wait` (the abstract one does not).
    # While the robust connection reconnects, or the robust channel reopens after the broker closed it (a publish
    # to a deleted exchange), this waits for the new channel: no longer than the publish may take.
    async with asyncio.timeout_at(deadline):
        if isinstance(channel, AbstractRobustChannel):
            await _restored(channel)
        if channel.is_closed:
            raise ChannelInvalidStateError(f"{channel!r} closed")
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    message_id = properties.message_id
    if not message_id:  # aiormq gives it a random one
        async with asyncio.timeout_at(deadline):
            await _publish(underlay, exchange, routing_key, body, properties, within_s)
        return
    async with asyncio.timeout_at(deadline):
        while (earlier := _in_flight.get(underlay, {}).get(message_id)) is not None:
            await earlier.wait()
    ids = _in_flight.setdefault(underlay, {})
    done = ids[message_id] = asyncio.Event()
    # Given up on (timeout, cancellation), the publish goes on waiting for the broker's answer in its own task and
    # keeps its message_id meanwhile: a return that comes late is matched to it, never to a later publish with the
    # same id (which the broker routed, and which would be failed as returned).
    answer = asyncio.ensure_future(_publish(underlay, exchange, routing_key, body, properties, ANSWER_WAIT_S))

    def release(task: "asyncio.Future[None]") -> None:
        if not task.cancelled():
            task.exception()  # retrieved: once given up on, a late failure has no one left to tell
        del ids[message_id]
        if not ids:
            _in_flight.pop(underlay, None)
        done.set()

    answer.add_done_callback(release)
    async with asyncio.timeout_at(deadline):
        await asyncio.shield(answer)


async def _restored(channel: AbstractRobustChannel) -> None:
    """Until the robust channel is restored, or closed for good (by the worker: it will not reopen).

    Restored, not just open: aio-pika reopens the channel, then restores its QoS, exchanges and queues on it. A
    publish the broker refuses in between (to a deleted exchange) closes the new channel under that restore, and
    aio-pika then never reopens it again: every later publish would fail. While the channel is closed this polls:
    aio-pika starts reopening only some loop turns after the close, so there is nothing to wait for yet."""
    if channel.is_closed:
        closed = asyncio.ensure_future(channel.closed())
        try:
            while channel.is_closed and not closed.done():
                await asyncio.wait({closed}, timeout=REOPEN_POLL_S)
            if closed.done():
                return
        finally:
            closed.cancel()  # a shield: the channel's own future is left alone
    await channel.ready()  # at once when the channel is restored, as it nearly always is


async def _publish(
    underlay: aiormq.Channel, exchange: str, routing_key: str, body: bytes, properties: Properties, within_s: float
) -> None:
    await underlay.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=True,
        timeout=within_s,
        wait=False,
    )

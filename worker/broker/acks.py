"""Acknowledges settled deliveries in few frames: one `multiple` ack per contiguous run of delivery tags.

A delivery is acked only after `settle` has every publish it caused confirmed; this module only decides how
the acks of one event-loop turn travel. Tags on a channel start at 1 and grow by one per delivery, so the
lowest run of finished tags can be acked with a single `basic.ack(multiple=true)`. Finished tags beyond a
gap (a slower request still in flight) are acked one by one in the same turn, so a slow request never holds
the prefetch window hostage.
"""

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiormq.abc
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

log = structlog.get_logger("worker.broker.acks")

# aiormq waits for room in its bounded write queue with no limit of its own. A peer that stops reading without
# closing (a partition) fills it, and when the heartbeat then ends the connection the waiting ack is never woken:
# without this bound the flush, and every ack after it, would wait forever, on the reconnected channel as well.
ACK_TIMEOUT_S = 30.0


@dataclass
class TagRuns:
    """Finished delivery tags of one channel; which to ack, and how, at the next flush."""

    next_tag: int = 1  # lowest tag not yet known to be finished
    finished: dict[int, bool] = field(default_factory=dict)  # tag → still needs an ack

    def ack(self, tag: int) -> None:
        self.finished[tag] = True

    def returned(self, tag: int) -> None:
        """Nacked back to the queue: finished, and nothing more to send for it."""
        self.finished[tag] = False

    def take(self) -> tuple[int | None, list[int]]:
        """(highest tag of the contiguous run to ack with `multiple`, tags beyond a gap to ack singly)."""
        run_end = None
        while self.next_tag in self.finished:
            if self.finished.pop(self.next_tag):
                run_end = self.next_tag
            self.next_tag += 1
        singles = [tag for tag, needs_ack in self.finished.items() if needs_ack]
        for tag in singles:
            self.finished[tag] = False
        return run_end, singles


class Acknowledger:
    def __init__(self) -> None:
        self._channels: dict[aiormq.abc.AbstractChannel, TagRuns] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._dirty = False  # acks arrived that no flush has sent yet
        # One flush at a time. aiormq's write queue is bounded, and a flush waiting for room in it can be
        # overtaken by another: a single ack would then reach the broker after a multiple ack that already
        # covered its tag, and the broker closes the channel over the unknown tag.
        self._sending = asyncio.Lock()

    def ack(self, delivery: AbstractIncomingMessage) -> None:
        """Ack at the end of this loop turn. Raises ChannelInvalidStateError if the delivery's channel is gone."""
        assert delivery.delivery_tag is not None  # consumed deliveries always have one
        self._runs(delivery).ack(delivery.delivery_tag)
        self._dirty = True
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_soon())

    def returned(self, delivery: AbstractIncomingMessage) -> None:
        with contextlib.suppress(ChannelInvalidStateError):
            if delivery.delivery_tag is not None:
                self._runs(delivery).returned(delivery.delivery_tag)

    async def flush(self) -> None:
        async with self._sending:
            for channel, runs in list(self._channels.items()):
                if channel.is_closed:
                    # The broker requeues whatever that channel left unacked.
                    del self._channels[channel]
                    continue
                run_end, singles = runs.take()
                try:
                    async with asyncio.timeout(ACK_TIMEOUT_S):
                        if run_end is not None:
                            await channel.basic_ack(run_end, multiple=True)
                        for tag in singles:
                            await channel.basic_ack(tag)
                except (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError) as exc:
                    # Unacked, the deliveries go back to the queue when their channel closes, as a stuck one does.
                    log.warning("ack_lost", error=f"{type(exc).__name__}: {exc}", hint="the broker delivers it again")

    async def _flush_soon(self) -> None:
        # Acks that arrive while a flush awaits the socket are sent by the next pass of this loop, never
        # left behind: between the last check and this task ending nothing else can run.
        while self._dirty:
            self._dirty = False
            await asyncio.sleep(0)  # let the other settles of this loop turn join the same frame
            await self.flush()

    def _runs(self, delivery: AbstractIncomingMessage) -> TagRuns:
        channel = delivery.channel
        runs = self._channels.get(channel)
        if runs is None:
            runs = self._channels[channel] = TagRuns()
        return runs

"""Ack coalescing: one multiple-ack for the contiguous run, single acks past a gap, nothing for returned tags."""

import asyncio

import pytest
from structlog.testing import capture_logs

from worker.broker import acks as acks_module
from worker.broker.acks import Acknowledger, TagRuns


def test_in_order_settles_become_one_multiple_ack() -> None:
    runs = TagRuns()
    for tag in (1, 2, 3):
        runs.ack(tag)

    assert runs.take() == (3, [])
    assert runs.take() == (None, [])


def test_a_slow_delivery_does_not_hold_back_the_acks_after_it() -> None:
    runs = TagRuns()
    runs.ack(1)
    runs.ack(3)
    runs.ack(4)

    assert runs.take() == (1, [3, 4])  # tag 2 is still in flight

    runs.ack(2)
    runs.ack(5)
    assert runs.take() == (5, [])  # 3 and 4 were acked already; 5 closes the run


def test_returned_tags_count_toward_the_run_but_are_not_acked() -> None:
    runs = TagRuns()
    runs.ack(1)
    runs.returned(2)

    assert runs.take() == (1, [])
    runs.returned(3)
    assert runs.take() == (None, [])
    runs.ack(4)
    assert runs.take() == (4, [])


class RecordingChannel:
    """Stands in for an aiormq channel: records the acks written, yielding to the loop on each like a socket."""

    def __init__(self) -> None:
        self.is_closed = False
        self.acks: list[tuple[int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        await asyncio.sleep(0)
        self.acks.append((delivery_tag, multiple))


class Delivery:
    def __init__(self, channel: RecordingChannel, tag: int) -> None:
        self.channel = channel
        self.delivery_tag = tag


async def test_an_ack_arriving_during_a_flush_is_not_left_behind() -> None:
    channel = RecordingChannel()
    acks = Acknowledger()
    acks.ack(Delivery(channel, 1))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the flush is now waiting on the socket
    acks.ack(Delivery(channel, 2))  # type: ignore[arg-type]

    for _ in range(10):
        await asyncio.sleep(0)

    assert channel.acks == [(1, True), (2, True)]


class FullQueueChannel(RecordingChannel):
    """Like aiormq's channel when its bounded write queue is full: the first ack waits for room, and a later
    one can find room first and overtake it."""

    def __init__(self) -> None:
        super().__init__()
        self.room = asyncio.Event()
        self.calls = 0

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.room.wait()
        self.acks.append((delivery_tag, multiple))


async def test_a_single_ack_never_reaches_the_broker_after_a_multiple_ack_that_covered_it() -> None:
    channel = FullQueueChannel()
    acks = Acknowledger()
    acks.ack(Delivery(channel, 2))  # type: ignore[arg-type]  # tag 1 still in flight: 2 goes singly
    for _ in range(3):
        await asyncio.sleep(0)  # the flush is now waiting for room to send tag 2
    acks.ack(Delivery(channel, 1))  # type: ignore[arg-type]
    acks.ack(Delivery(channel, 3))  # type: ignore[arg-type]  # 1..3 now one run, to be acked up to 3
    shutdown_flush = asyncio.create_task(acks.flush())  # as `Consumer.drain` flushes at the end
    for _ in range(3):
        await asyncio.sleep(0)
    channel.room.set()
    await shutdown_flush
    for _ in range(10):
        await asyncio.sleep(0)

    covered = 0  # highest tag a multiple ack on the wire has already acked
    for tag, multiple in channel.acks:
        assert multiple or tag > covered, f"single ack of {tag} after a multiple ack up to {covered}: {channel.acks}"
        covered = max(covered, tag) if multiple else covered
    assert channel.acks == [(2, False), (3, True)]


class StuckChannel(RecordingChannel):
    """Like aiormq's channel after a partition: its write queue is full and nothing will ever make room."""

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        await asyncio.Event().wait()


async def test_an_ack_stuck_behind_a_dead_socket_does_not_stop_every_later_ack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(acks_module, "ACK_TIMEOUT_S", 0.05)
    stuck, healthy = StuckChannel(), RecordingChannel()
    acks = Acknowledger()
    with capture_logs() as logs:
        acks.ack(Delivery(stuck, 1))  # type: ignore[arg-type]
        await asyncio.wait_for(acks.flush(), 5)  # gives up on the dead socket instead of waiting forever
        acks.ack(Delivery(healthy, 1))  # type: ignore[arg-type]  # e.g. the channel after the reconnect
        await asyncio.wait_for(acks.flush(), 5)

    assert healthy.acks == [(1, True)]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["ack_lost"]

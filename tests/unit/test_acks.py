"""Ack coalescing: one multiple-ack for the contiguous run, single acks past a gap, nothing for returned tags."""

import asyncio

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

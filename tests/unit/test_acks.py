"""Ack coalescing: one multiple-ack for the contiguous run, single acks past a gap, nothing for returned tags."""

from worker.acks import TagRuns


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

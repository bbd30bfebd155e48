"""The entries all requests in flight may hold together: who waits, who goes first, and what cancelling does."""

import asyncio

import pytest

from worker.broker.entries_in_flight import EntriesInFlight


async def admitted(budget: EntriesInFlight, entries: int) -> "asyncio.Task[None]":
    """A request asking for `entries`, given the loop's turn to either take them or start waiting."""
    task = asyncio.create_task(budget.acquire(entries))
    await asyncio.sleep(0)
    return task


async def test_requests_that_fit_go_at_once_and_one_that_does_not_waits_for_room() -> None:
    budget = EntriesInFlight(100)
    await budget.acquire(60)
    await budget.acquire(40)

    late = await admitted(budget, 10)
    assert not late.done()
    assert (budget.held, budget.waiting) == (100, 1)

    budget.release(40)
    await late
    assert (budget.held, budget.waiting) == (70, 0)


async def test_a_small_request_never_waits_behind_a_large_one() -> None:
    budget = EntriesInFlight(100)
    await budget.acquire(90)  # a large request, its provider hanging

    large = await admitted(budget, 80)
    small = await admitted(budget, 5)

    assert small.done()
    assert not large.done()
    budget.release(90)
    await large
    assert budget.held == 85


async def test_waiting_requests_are_let_in_in_arrival_order_as_room_frees() -> None:
    budget = EntriesInFlight(100)
    await budget.acquire(100)
    first, second = await admitted(budget, 60), await admitted(budget, 60)

    budget.release(100)
    await asyncio.sleep(0)

    assert first.done()
    assert not second.done()
    assert budget.held == 60


async def test_a_cancelled_waiter_leaves_the_line_and_holds_nothing() -> None:
    budget = EntriesInFlight(100)
    await budget.acquire(100)
    gone, kept = await admitted(budget, 50), await admitted(budget, 50)

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert budget.waiting == 1

    budget.release(100)
    await kept
    assert budget.held == 50


async def test_a_waiter_cancelled_as_it_is_let_in_gives_its_room_back() -> None:
    budget = EntriesInFlight(100)
    await budget.acquire(100)
    waiter = await admitted(budget, 70)

    budget.release(100)  # lets the waiter in; it is cancelled before it runs again
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert (budget.held, budget.waiting) == (0, 0)


async def test_a_request_larger_than_the_limit_goes_alone() -> None:
    budget = EntriesInFlight(100)
    await budget.acquire(250)
    assert budget.held == 100
    budget.release(250)
    assert budget.held == 0

"""Circuit breaker: opens after repeated failures, lets one probe through after the cooldown."""

from structlog.testing import capture_logs

from worker.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(b: CircuitBreaker) -> BreakerState:
    return b.state  # read through a call, so type narrowing does not outlive state changes


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("acme", "http://llm:8000/v1", failure_threshold=3, cooldown_s=30, clock=clock)


def test_opens_after_consecutive_failures_and_refuses_calls() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert state(b) is BreakerState.CLOSED
    assert b.allow()
    with capture_logs() as logs:
        b.record_failure()

    assert state(b) is BreakerState.OPEN
    assert not b.allow()
    assert logs[0]["event"] == "circuit_open"
    assert logs[0]["tenant_id"] == "acme"


def test_a_success_resets_the_count() -> None:
    b = breaker(Clock())
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert state(b) is BreakerState.CLOSED


def test_after_cooldown_exactly_one_probe_goes_through() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()

    clock.now += 29
    assert not b.allow()
    clock.now += 1
    assert b.allow()
    assert state(b) is BreakerState.HALF_OPEN
    assert not b.allow()  # the probe is still in flight


def test_probe_success_closes_and_probe_failure_reopens_for_another_cooldown() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 30
    assert b.allow()
    b.record_failure()
    assert state(b) is BreakerState.OPEN
    assert not b.allow()

    clock.now += 30
    assert b.allow()
    b.record_success()
    assert state(b) is BreakerState.CLOSED
    assert b.allow()


def test_cancelled_probe_frees_the_slot_for_the_next_one() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 30
    assert b.allow()
    b.record_nothing()
    assert b.allow()

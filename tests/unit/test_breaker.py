"""Circuit breaker: opens on the failure rate of recent requests, probes a few calls after the cooldown."""

import pytest
from structlog.testing import capture_logs

from contracts import Fallback
from worker.errors import ErrorClass, ProviderError
from worker.handling.ladder import RetryLadder
from worker.providers.base import ModelCall, ModelResult
from worker.providers.bounded import GuardedProvider
from worker.providers.breaker import BreakerBoard, BreakerPolicy, BreakerState, CircuitBreaker, Permit

POLICY = BreakerPolicy(failure_rate=0.5, min_calls=4, window_s=60, cooldown_s=30, probes=3)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, policy: BreakerPolicy = POLICY) -> CircuitBreaker:
    return CircuitBreaker("acme", "http://llm:8000/v1", policy, clock=clock)


def call(b: CircuitBreaker, subject: str, outcome: str) -> Permit | None:
    """One call for `subject`: ok | fail | cancel; returns the permit (None when refused)."""
    permit = b.admit(subject)
    if permit is not None:
        {"ok": b.succeeded, "fail": b.failed, "cancel": b.released}[outcome](permit)
    return permit


def open_breaker(clock: Clock) -> CircuitBreaker:
    b = breaker(clock)
    for n in range(4):
        call(b, f"r{n}", "fail")
    assert b.current_state() is BreakerState.OPEN
    return b


# (calls as subject:outcome, state after them). min_calls 4, failure rate 0.5, each subject counts once.
CLOSED_TABLE = [
    (["a:fail", "b:fail", "c:fail"], BreakerState.CLOSED),  # too few requests to judge
    (["a:fail", "b:fail", "c:ok", "d:ok"], BreakerState.OPEN),  # 2 of 4 failed: the rate is reached
    (["a:fail", "b:ok", "c:ok", "d:ok"], BreakerState.CLOSED),  # 1 of 4
    # One request failing on every retry is one failing request, not five failures.
    (["a:fail", "a:fail", "a:fail", "a:fail", "a:fail", "b:ok", "c:ok"], BreakerState.CLOSED),
    (["a:fail", "b:ok", "c:ok", "a:fail", "a:fail", "d:ok", "a:fail"], BreakerState.CLOSED),
    # A request's latest call is what counts: a request that healed no longer weighs as failed.
    (["a:fail", "b:fail", "a:ok", "b:ok", "c:fail", "d:ok"], BreakerState.CLOSED),
    (["a:fail", "b:fail", "c:fail", "d:cancel", "e:cancel"], BreakerState.CLOSED),  # cancelled calls say nothing
]


@pytest.mark.parametrize(("calls", "expected"), CLOSED_TABLE)
def test_closed_breaker_opens_on_the_failure_rate_of_distinct_requests(
    calls: list[str], expected: BreakerState
) -> None:
    b = breaker(Clock())
    for step in calls:
        subject, outcome = step.split(":")
        call(b, subject, outcome)
    assert b.current_state() is expected


def test_failures_older_than_the_window_no_longer_count() -> None:
    clock = Clock()
    b = breaker(clock)
    call(b, "a", "fail")
    call(b, "b", "fail")
    clock.now += 61
    call(b, "c", "fail")
    call(b, "d", "ok")
    call(b, "e", "ok")
    call(b, "f", "ok")
    assert b.current_state() is BreakerState.CLOSED  # 1 of 4 in the window; 3 of 6 had the old ones counted


def test_open_refuses_until_the_cooldown_then_half_open_hands_out_only_the_probes() -> None:
    clock = Clock()
    with capture_logs() as logs:
        b = open_breaker(clock)
    assert [e["event"] for e in logs] == ["circuit_open"]
    assert logs[0]["window_requests"] == 4
    assert logs[0]["window_failures"] == 4
    assert b.admit("x") is None
    assert b.retry_after_s() == 30
    clock.now += 29
    assert b.admit("x") is None
    assert b.retry_after_s() == 1
    clock.now += 1
    permits = [b.admit(f"p{n}") for n in range(4)]
    assert b.current_state() is BreakerState.HALF_OPEN
    assert [p is not None and p.probe for p in permits] == [True, True, True, False]
    assert b.retry_after_s() == 0


def test_the_state_turns_half_open_when_the_cooldown_passes_without_any_call() -> None:
    clock = Clock()
    board = BreakerBoard(POLICY, clock=clock)
    b = board.get("acme", "http://llm:8000/v1")
    for n in range(4):
        call(b, f"r{n}", "fail")
    assert board.states() == {("acme", "http://llm:8000/v1"): BreakerState.OPEN}
    clock.now += 30
    assert board.states() == {("acme", "http://llm:8000/v1"): BreakerState.HALF_OPEN}


# Outcomes of the half-open round's probes, and the state they lead to (3 probes, rate 0.5: 2 decide).
PROBE_TABLE = [
    (["ok", "ok"], BreakerState.CLOSED),
    (["ok", "fail", "ok"], BreakerState.CLOSED),
    (["fail", "fail"], BreakerState.OPEN),
    (["ok", "fail", "fail"], BreakerState.OPEN),
    (["ok"], BreakerState.HALF_OPEN),  # undecided: still probing
    (["cancel", "cancel", "cancel", "ok", "ok"], BreakerState.CLOSED),  # cancelled probes free their slot
]


@pytest.mark.parametrize(("outcomes", "expected"), PROBE_TABLE)
def test_probes_close_the_circuit_unless_too_many_fail(outcomes: list[str], expected: BreakerState) -> None:
    clock = Clock()
    b = open_breaker(clock)
    clock.now += 30
    for n, outcome in enumerate(outcomes):
        assert call(b, f"probe{n}", outcome) is not None
    assert b.current_state() is expected


def test_reopened_circuit_waits_another_cooldown_and_closed_one_forgets_the_outage() -> None:
    clock = Clock()
    b = open_breaker(clock)
    clock.now += 30
    call(b, "p1", "fail")
    call(b, "p2", "fail")
    assert b.current_state() is BreakerState.OPEN
    clock.now += 29
    assert b.admit("x") is None
    clock.now += 1
    call(b, "p3", "ok")
    call(b, "p4", "ok")
    assert b.current_state() is BreakerState.CLOSED
    call(b, "after", "fail")  # the outage's failures were forgotten: one failure is no rate
    assert b.current_state() is BreakerState.CLOSED


def test_calls_admitted_before_the_circuit_opened_do_not_decide_the_probes() -> None:
    clock = Clock()
    b = breaker(clock)
    early = b.admit("slow")
    assert early is not None
    for n in range(4):
        call(b, f"r{n}", "fail")
    clock.now += 30
    probe = b.admit("probe")
    assert probe is not None
    b.failed(early)  # the slow call from before ends now: not a probe, so it does not reopen
    assert b.current_state() is BreakerState.HALF_OPEN


def test_a_policy_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        BreakerPolicy(failure_rate=0)
    with pytest.raises(ValueError, match="window_s"):
        BreakerPolicy(window_s=0)


def test_the_default_ladder_covers_the_default_cooldown_for_the_default_attempts() -> None:
    # A request without a deadline waits for an open circuit as long as its attempts could take.
    patience = RetryLadder().span_s(Fallback().max_attempts)
    assert patience >= BreakerPolicy().cooldown_s


class Failing:
    """A provider stand-in that fails every call with the given error code and class."""

    kind, endpoint, model = "openai_compatible", "http://llm:8000/v1", "m"

    def __init__(self, error_class: ErrorClass, code: str) -> None:
        self.error = ProviderError(error_class, "boom", code=code)

    async def aclose(self) -> None:
        pass

    async def complete(self, call: ModelCall) -> ModelResult:
        raise self.error


@pytest.mark.parametrize(
    ("error_class", "code", "expected"),
    [
        (ErrorClass.TRANSIENT, "provider_unavailable", BreakerState.OPEN),
        (ErrorClass.RATE_LIMITED, "rate_limited", BreakerState.OPEN),
        (ErrorClass.TRANSIENT, "malformed_response", BreakerState.CLOSED),  # the endpoint answered at once
        (ErrorClass.BAD_REQUEST, "bad_request", BreakerState.CLOSED),
        (ErrorClass.CONTENT_FILTERED, "content_filtered", BreakerState.CLOSED),
        (ErrorClass.CONTEXT_OVERFLOW, "context_overflow", BreakerState.CLOSED),
    ],
)
async def test_only_availability_failures_of_the_endpoint_count(
    error_class: ErrorClass, code: str, expected: BreakerState
) -> None:
    guarded = GuardedProvider(Failing(error_class, code), breaker(Clock()))
    call = ModelCall(system="s", turns=(), max_output_tokens=10, timeout_s=1)
    for n in range(4):
        with pytest.raises(ProviderError):
            await guarded.complete(call, subject=f"r{n}")
    assert guarded.breaker.current_state() is expected


def test_retries_failing_again_do_not_count_but_their_successes_do() -> None:
    # After a restart the traffic is mostly retries of requests that fail every time: they must not open it.
    clock = Clock()
    b = breaker(clock)
    for n in range(10):
        permit = b.admit(f"retry{n}", failed_before=True)
        assert permit is not None
        b.failed(permit)
    assert b.current_state() is BreakerState.CLOSED
    healed = b.admit("retry0", failed_before=True)
    assert healed is not None
    b.succeeded(healed)
    for n in range(3):
        call(b, f"fresh{n}", "fail")
    assert b.current_state() is BreakerState.OPEN  # 3 fresh failures of 4 judged requests
    clock.now += 30
    probe = b.admit("retry1", failed_before=True)
    assert probe is not None
    b.failed(probe)  # a retry failing as a probe frees its slot instead of deciding
    assert b.current_state() is BreakerState.HALF_OPEN

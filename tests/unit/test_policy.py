"""The fallback decision table, row by row, without a broker."""

import itertools

import pytest

from contracts import FallbackPolicy, Status
from worker.errors import ErrorClass
from worker.handling.ladder import RetryLadder
from worker.handling.outcome import DeadLetterReason
from worker.handling.policy import Action, Decision, decide, decide_refused

LADDER = RetryLadder(base_s=1.0, factor=2.5, levels=8)
FAIL_CLOSED, RETRY, CLOUD = FallbackPolicy.FAIL_CLOSED, FallbackPolicy.QUEUE_AND_RETRY, FallbackPolicy.ATLAS_CLOUD
UNAVAILABLE = Decision(Action.REPLY, Status.UNAVAILABLE)
FAILED_DLQ = Decision(Action.REPLY, Status.FAILED, dead_letter=True)
REROUTE = Decision(Action.REROUTE)


def outcome(
    error: ErrorClass,
    policy: FallbackPolicy,
    attempts: int = 1,
    time_left_s: float | None = None,
    retry_after_s: float | None = None,
) -> Decision:
    decision = decide(
        error,
        policy,
        attempts=attempts,
        max_attempts=5,
        time_left_s=time_left_s,
        ladder=LADDER,
        retry_after_s=retry_after_s,
    )
    # Compare the what, not the human-readable why.
    return Decision(decision.action, decision.status, decision.dead_letter, decision.retry_level)


@pytest.mark.parametrize(
    ("error", "fail_closed", "atlas_cloud"),
    [
        (ErrorClass.TRANSIENT, UNAVAILABLE, REROUTE),
        (ErrorClass.RATE_LIMITED, UNAVAILABLE, REROUTE),
        (ErrorClass.QUOTA, UNAVAILABLE, REROUTE),
        (ErrorClass.AUTH, UNAVAILABLE, REROUTE),
        (ErrorClass.NOT_FOUND, UNAVAILABLE, REROUTE),
        (ErrorClass.BAD_REQUEST, FAILED_DLQ, FAILED_DLQ),
        (ErrorClass.CONTENT_FILTERED, FAILED_DLQ, FAILED_DLQ),
        (ErrorClass.CONTEXT_OVERFLOW, FAILED_DLQ, FAILED_DLQ),
    ],
)
def test_fail_closed_and_atlas_cloud_rows(error: ErrorClass, fail_closed: Decision, atlas_cloud: Decision) -> None:
    assert outcome(error, FAIL_CLOSED) == fail_closed
    assert outcome(error, CLOUD) == atlas_cloud


@pytest.mark.parametrize("error", [ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED])
def test_queue_and_retry_climbs_the_ladder_then_fails_and_dead_letters(error: ErrorClass) -> None:
    assert [outcome(error, RETRY, attempts=n).retry_level for n in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert outcome(error, RETRY, attempts=5) == FAILED_DLQ


@pytest.mark.parametrize(
    "error",
    [
        ErrorClass.QUOTA,
        ErrorClass.AUTH,
        ErrorClass.NOT_FOUND,
        ErrorClass.BAD_REQUEST,
        ErrorClass.CONTENT_FILTERED,
        ErrorClass.CONTEXT_OVERFLOW,
    ],
)
def test_queue_and_retry_does_not_retry_what_a_retry_cannot_fix(error: ErrorClass) -> None:
    assert outcome(error, RETRY) == FAILED_DLQ


def test_retry_that_would_come_back_after_the_deadline_expires_instead() -> None:
    assert outcome(ErrorClass.TRANSIENT, RETRY, attempts=3, time_left_s=7.0).retry_level == 2  # 6.25 s fits
    assert outcome(ErrorClass.TRANSIENT, RETRY, attempts=3, time_left_s=6.0) == Decision(
        Action.REPLY, Status.EXPIRED, dead_letter=True
    )


def test_retry_after_picks_the_first_level_at_least_that_long() -> None:
    assert outcome(ErrorClass.RATE_LIMITED, RETRY, attempts=1, retry_after_s=5.0).retry_level == 2  # 6.25 s
    assert outcome(ErrorClass.RATE_LIMITED, RETRY, attempts=1, retry_after_s=1.0).retry_level == 0
    # Never earlier than the backoff would have been.
    assert outcome(ErrorClass.RATE_LIMITED, RETRY, attempts=4, retry_after_s=1.0).retry_level == 3
    # Longer than the whole ladder: the last level.
    assert outcome(ErrorClass.RATE_LIMITED, RETRY, attempts=1, retry_after_s=10_000).retry_level == 7


def test_default_ladder_spans_about_a_second_to_about_ten_minutes() -> None:
    delays = RetryLadder().delays_s
    assert delays[0] == 1.0
    assert 500 <= delays[-1] <= 700
    assert all(later > earlier for earlier, later in itertools.pairwise(delays))


def test_ladder_span_is_the_time_spent_parked_between_attempts() -> None:
    ladder = RetryLadder(base_s=1.0, factor=2.0, levels=3)
    assert ladder.span_s(1) == 0
    assert ladder.span_s(3) == 1.0 + 2.0
    assert ladder.span_s(5) == 1.0 + 2.0 + 4.0 + 4.0  # the last level repeats


# A call refused by an open circuit: (policy, next probe in s, deadline left, patience left) → decision.
# Ladder delays 1, 2.5, 6.25, 15.6, 39 … s; the wait is the first level at least as long as the probe is away.
REFUSED_TABLE = [
    (FAIL_CLOSED, 10.0, None, 100.0, UNAVAILABLE),
    (CLOUD, 10.0, None, 100.0, REROUTE),
    (RETRY, 10.0, None, 100.0, Decision(Action.WAIT, retry_level=3)),  # 15.6 s ≥ 10 s
    (RETRY, 0.5, None, 100.0, Decision(Action.WAIT, retry_level=0)),
    (RETRY, 0.0, None, -5.0, Decision(Action.WAIT, retry_level=0)),  # half-open: the probes decide
    (RETRY, 10.0, 30.0, 100.0, Decision(Action.WAIT, retry_level=3)),  # back at 15.6 s, before the deadline
    (RETRY, 10.0, 12.0, 100.0, Decision(Action.REPLY, Status.EXPIRED, dead_letter=True)),  # back too late
    (RETRY, 40.0, 30.0, 100.0, Decision(Action.REPLY, Status.EXPIRED, dead_letter=True)),  # probe too late
    (RETRY, 10.0, None, 9.0, FAILED_DLQ),  # the probe comes after the request's patience
    (RETRY, 10.0, None, 11.0, Decision(Action.WAIT, retry_level=3)),  # … or just within it
    (RETRY, 1000.0, None, 2000.0, Decision(Action.WAIT, retry_level=7)),  # longer than the ladder: its top
]


@pytest.mark.parametrize(("policy", "wait_s", "time_left_s", "patience_left_s", "expected"), REFUSED_TABLE)
def test_a_refused_call_waits_for_the_probe_unless_the_deadline_or_patience_passes_first(
    policy: FallbackPolicy, wait_s: float, time_left_s: float | None, patience_left_s: float, expected: Decision
) -> None:
    decision = decide_refused(
        policy, wait_s=wait_s, time_left_s=time_left_s, patience_left_s=patience_left_s, ladder=LADDER
    )
    got = (decision.action, decision.status, decision.dead_letter, decision.retry_level)
    assert got == (expected.action, expected.status, expected.dead_letter, expected.retry_level)


def test_a_decision_that_ends_retrying_says_why() -> None:
    def stopped(**kwargs: float | int | None) -> str | None:
        return decide(ErrorClass.TRANSIENT, RETRY, max_attempts=4, ladder=LADDER, **kwargs).stopped_because  # type: ignore[arg-type]

    assert stopped(attempts=4, time_left_s=None) == "attempts_exhausted"
    assert stopped(attempts=1, time_left_s=0.5) == "deadline"
    assert stopped(attempts=1, time_left_s=None) is None  # it goes on retrying

    def refused(time_left_s: float | None, patience_left_s: float) -> str | None:
        decision = decide_refused(
            RETRY, wait_s=10.0, time_left_s=time_left_s, patience_left_s=patience_left_s, ladder=LADDER
        )
        return decision.stopped_because

    assert refused(12.0, 100.0) == "deadline"
    assert refused(None, 9.0) == "circuit_open"
    assert refused(None, 100.0) is None


# The whole decision beyond the table: (error, policy, attempts, deadline left) → dead-letter reason, whether
# the attempt counts, whether the policy changed the request's course.
REASONS = DeadLetterReason
WHOLE_TABLE = [
    (ErrorClass.BAD_REQUEST, RETRY, 1, None, (REASONS.PERMANENT_ERROR, True, False)),
    (ErrorClass.BAD_REQUEST, FAIL_CLOSED, 2, None, (REASONS.PERMANENT_ERROR, True, True)),  # back from the ladder
    (ErrorClass.AUTH, RETRY, 1, None, (REASONS.PERMANENT_ERROR, True, False)),
    (ErrorClass.TRANSIENT, FAIL_CLOSED, 1, None, (None, True, True)),  # fail_closed answered
    (ErrorClass.TRANSIENT, CLOUD, 1, None, (None, True, True)),
    (ErrorClass.TRANSIENT, RETRY, 1, None, (None, True, False)),  # first retry
    (ErrorClass.TRANSIENT, RETRY, 2, None, (None, True, True)),
    (ErrorClass.RATE_LIMITED, RETRY, 5, None, (REASONS.EXHAUSTED, True, True)),
    (ErrorClass.TRANSIENT, RETRY, 1, 0.5, (REASONS.EXPIRED, True, False)),
]


@pytest.mark.parametrize(("error", "policy", "attempts", "time_left_s", "expected"), WHOLE_TABLE)
def test_the_decision_says_why_it_dead_letters_and_what_it_costs(
    error: ErrorClass,
    policy: FallbackPolicy,
    attempts: int,
    time_left_s: float | None,
    expected: tuple[DeadLetterReason | None, bool, bool],
) -> None:
    decision = decide(error, policy, attempts=attempts, max_attempts=5, time_left_s=time_left_s, ladder=LADDER)
    assert (decision.dead_letter_reason, decision.costs_attempt, decision.fallback_used) == expected
    assert decision.dead_letter == (decision.dead_letter_reason is not None)


REFUSED_WHOLE_TABLE = [
    # (policy, next probe in s, deadline left, patience left, attempts made) → reason, fallback_used
    (FAIL_CLOSED, 10.0, None, 100.0, 0, (None, True)),
    (CLOUD, 10.0, None, 100.0, 0, (None, True)),
    (RETRY, 10.0, None, 100.0, 0, (None, False)),  # waits: nothing has failed before
    (RETRY, 10.0, None, 100.0, 2, (None, True)),
    (RETRY, 10.0, 12.0, 100.0, 1, (REASONS.EXPIRED, True)),
    (RETRY, 10.0, None, 9.0, 0, (REASONS.CIRCUIT_OPEN, False)),
]


@pytest.mark.parametrize(
    ("policy", "wait_s", "time_left_s", "patience_left_s", "attempts", "expected"), REFUSED_WHOLE_TABLE
)
def test_a_refused_call_never_costs_an_attempt(
    policy: FallbackPolicy,
    wait_s: float,
    time_left_s: float | None,
    patience_left_s: float,
    attempts: int,
    expected: tuple[DeadLetterReason | None, bool],
) -> None:
    decision = decide_refused(
        policy,
        wait_s=wait_s,
        time_left_s=time_left_s,
        patience_left_s=patience_left_s,
        ladder=LADDER,
        attempts=attempts,
    )
    assert not decision.costs_attempt
    assert (decision.dead_letter_reason, decision.fallback_used) == expected
    assert decision.dead_letter == (decision.dead_letter_reason is not None)

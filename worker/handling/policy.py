"""The fallback decision: (error class × tenant policy × attempts × deadline) → what happens next.

Pure and broker-free. The table, as promised to tenants (README "Failure policy"):

| error class                  | fail_closed       | queue_and_retry                     | atlas_cloud       |
|------------------------------|-------------------|-------------------------------------|-------------------|
| transient, rate_limited      | reply unavailable | retry on the ladder; when attempts  | reroute           |
|                              |                   | or the deadline run out: failed /   |                   |
|                              |                   | expired reply + dead letter         |                   |
| quota, auth, not_found       | reply unavailable | failed reply + dead letter (a retry | reroute           |
|                              |                   | cannot fix it; replay after the fix)|                   |
| bad_request, content_filtered| failed reply +    | failed reply + dead letter          | failed reply +    |
| context_overflow             | dead letter       |                                     | dead letter       |
| config                       | failed reply + dead letter (`tenant_config_invalid`) under every policy   |

The bad-request rows never leave the tenant's network: a request the tenant's model rejected as wrong or
unsafe would be just as wrong for Atlas Cloud, so it is not rerouted. Nor is a config fault (a secret that
does not resolve): the provider was not even called, so nothing is known about it, and an operator's mistake
is never the tenant's consent to send its data elsewhere. Fixed, the dead letter can be replayed.

A call refused by an open circuit is no provider attempt (`decide_refused`): under `queue_and_retry` the
request waits on the ladder for the circuit's next probe and ends only when that probe would come after
its deadline (or its patience, when it has no deadline); `fail_closed` answers `unavailable` at once and
`atlas_cloud` reroutes, as for any availability failure.

The decision is whole: what to do, with which reply status, whether and why to dead-letter (the
`atlas-reason`), whether it costs an attempt, and whether the policy changed the request's course
(`fallback_used`: it came back from the ladder, or fail_closed answered).
"""

from dataclasses import dataclass
from enum import StrEnum

from contracts import FallbackPolicy, Status
from contracts.messages import StoppedBecause
from worker.errors import ErrorClass
from worker.handling.ladder import RetryLadder
from worker.handling.outcome import DeadLetterReason

AVAILABILITY = frozenset({ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED})
MISCONFIGURED = frozenset({ErrorClass.QUOTA, ErrorClass.AUTH, ErrorClass.NOT_FOUND})
REQUEST_IS_WRONG = frozenset({ErrorClass.BAD_REQUEST, ErrorClass.CONTENT_FILTERED, ErrorClass.CONTEXT_OVERFLOW})


class Action(StrEnum):
    REPLY = "reply"  # reply with `status`; dead-letter too when `dead_letter`
    RETRY = "retry"  # park on ladder level `retry_level`
    WAIT = "wait"  # park on ladder level `retry_level` for an open circuit's next probe; costs no attempt
    REROUTE = "reroute"  # republish to the Atlas Cloud exchange


@dataclass(frozen=True)
class Decision:
    action: Action
    status: Status | None = None
    dead_letter: bool = False
    retry_level: int | None = None
    reason: str = ""  # the why, for logs and traces
    stopped_because: StoppedBecause | None = None  # why retrying ended, when it did
    dead_letter_reason: DeadLetterReason | None = None  # set exactly when `dead_letter`
    costs_attempt: bool = True  # False: the provider was not called, the attempt count stays
    fallback_used: bool = False  # the policy changed the request's course (see the module docstring)


def decide(
    error_class: ErrorClass,
    policy: FallbackPolicy,
    *,
    attempts: int,
    max_attempts: int,
    time_left_s: float | None,
    ladder: RetryLadder,
    retry_after_s: float | None = None,
) -> Decision:
    """What to do after the `attempts`-th provider attempt failed with `error_class`."""
    came_back = attempts > 1  # an earlier attempt put it on the ladder
    if error_class is ErrorClass.CONFIG:
        why = "the tenant's provider settings cannot be used here"
        return _dead_lettered(
            Status.FAILED, DeadLetterReason.TENANT_CONFIG_INVALID, why, came_back, provider_called=False
        )
    if error_class in REQUEST_IS_WRONG:
        return _dead_lettered(
            Status.FAILED, DeadLetterReason.PERMANENT_ERROR, "request rejected by provider", came_back
        )
    if policy is FallbackPolicy.FAIL_CLOSED:
        return Decision(
            Action.REPLY, Status.UNAVAILABLE, reason="provider failed; policy fail_closed", fallback_used=True
        )
    if policy is FallbackPolicy.ATLAS_CLOUD:
        return Decision(
            Action.REROUTE, reason=f"provider failed ({error_class.value}); policy atlas_cloud", fallback_used=True
        )
    if error_class in MISCONFIGURED:
        return _dead_lettered(Status.FAILED, DeadLetterReason.PERMANENT_ERROR, "provider misconfigured", came_back)
    if attempts >= max_attempts:
        why = f"gave up after {attempts} attempts"
        return _dead_lettered(Status.FAILED, DeadLetterReason.EXHAUSTED, why, came_back, "attempts_exhausted")
    level = ladder.level_for(attempts, retry_after_s)
    if time_left_s is not None and ladder.delays_s[level] >= time_left_s:
        why = "next retry would miss the deadline"
        return _dead_lettered(Status.EXPIRED, DeadLetterReason.EXPIRED, why, came_back, "deadline")
    return Decision(
        Action.RETRY, retry_level=level, reason=f"retry {attempts + 1} of {max_attempts}", fallback_used=came_back
    )


def decide_refused(
    policy: FallbackPolicy,
    *,
    wait_s: float,
    time_left_s: float | None,
    patience_left_s: float,
    ladder: RetryLadder,
    attempts: int = 0,
) -> Decision:
    """What to do when an open circuit refused the call; its next probe is `wait_s` away. The call is no
    attempt: `attempts` (those already made) stays as it is.

    `time_left_s` is what remains of the request's deadline (None: it has none), `patience_left_s` what
    remains of the time its attempts could take on the ladder, counted from its first failure.
    """
    came_back = attempts > 0
    if policy is FallbackPolicy.FAIL_CLOSED:
        return Decision(
            Action.REPLY,
            Status.UNAVAILABLE,
            reason="circuit open; policy fail_closed",
            costs_attempt=False,
            fallback_used=True,
        )
    if policy is FallbackPolicy.ATLAS_CLOUD:
        return Decision(
            Action.REROUTE, reason="circuit open; policy atlas_cloud", costs_attempt=False, fallback_used=True
        )
    level = ladder.level_for(0, wait_s)  # the first level at least as long as the rest of the cooldown
    delay = ladder.delays_s[level]
    if time_left_s is not None and max(delay, wait_s) >= time_left_s:  # the probe, or its return, is too late
        why = "the request's deadline"
        return _dead_lettered(
            Status.EXPIRED, DeadLetterReason.EXPIRED, why, came_back, "deadline", provider_called=False
        )
    # Patience is the soft bound: the next probe must fall within it. Half-open (no wait) never ends a
    # request here: its probes are bounded by the tenant's timeout, and their outcome decides.
    if wait_s > 0 and wait_s >= patience_left_s:
        why = "the time its attempts could take"
        return _dead_lettered(
            Status.FAILED, DeadLetterReason.CIRCUIT_OPEN, why, came_back, "circuit_open", provider_called=False
        )
    return Decision(
        Action.WAIT,
        retry_level=level,
        reason=f"circuit open; next probe in {wait_s:.1f}s",
        costs_attempt=False,
        fallback_used=came_back,
    )


def _dead_lettered(
    status: Status,
    reason: DeadLetterReason,
    why: str,
    came_back: bool,
    stopped_because: StoppedBecause | None = None,
    *,
    provider_called: bool = True,
) -> Decision:
    """A reply that also dead-letters the request; `provider_called` False: no attempt was made (an open circuit
    refused the call, or the tenant's settings could not be used)."""
    return Decision(
        Action.REPLY,
        status,
        dead_letter=True,
        reason=why,
        stopped_because=stopped_because,
        dead_letter_reason=reason,
        costs_attempt=provider_called,
        fallback_used=came_back,
    )

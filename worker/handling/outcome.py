"""What handling a delivery decided; `settle` turns exactly one of these into publishes and an ack."""

from dataclasses import dataclass
from typing import Final

from contracts import AttemptRecord, ErrorInfo, InferenceReply


@dataclass(frozen=True, slots=True)
class RequestIds:
    """Who a delivery is about, as far as it could be read (a malformed body may lack any of these)."""

    request_id: str | None
    tenant_id: str | None
    task: str | None


# Every reason the worker dead-letters for; metrics count these and fold anything else into `other`.
DEAD_LETTER_REASONS: Final = frozenset(
    {
        "malformed",
        "publisher_refused",
        "tenant_config_invalid",
        "expired",
        "exhausted",
        "permanent_error",
        "circuit_open",
        "internal_error",
        "reply_unroutable",
        "reroute_unroutable",
    }
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Park the original message on `{ns}.dead` for an operator, with the reason in headers."""

    reason: str  # one of DEAD_LETTER_REASONS
    error: ErrorInfo
    provider_kind: str | None = None
    attempts: int = 0
    # The request's failed tries including this one; empty leaves the history it arrived with.
    history: tuple[AttemptRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the publisher (when there is someone to answer); optionally also dead-letter the request."""

    reply: InferenceReply | None
    dead_letter: DeadLetter | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Park the original message on a ladder level; it returns to `{ns}.requests` after the level's TTL."""

    level: int
    attempts: int
    error: ErrorInfo
    provider_kind: str | None = None
    # An open circuit refused the call: the request waits for its next probe. The provider was not called,
    # so the attempt count and the last provider error on the message stay as they were.
    refused_by_circuit: bool = False
    delay_s: float = 0.0  # the level's delay: when the next attempt is due, for the logs
    history: tuple[AttemptRecord, ...] = ()  # the request's failed tries, this one included


@dataclass(frozen=True, slots=True)
class Defer:
    """Over the tenant's concurrency limit: come back shortly, without counting an attempt."""


@dataclass(frozen=True, slots=True)
class Reroute:
    """Republish the original message, unchanged, to the Atlas Cloud exchange (data leaves the network)."""

    reason: str
    error: ErrorInfo | None = None
    provider_kind: str | None = None
    attempts: int = 0


Outcome = Reply | Retry | Defer | Reroute

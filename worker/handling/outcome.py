"""A delivery's context in, what handling decided out: `settle` turns exactly one outcome into publishes and an ack."""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from contracts import AttemptRecord, ErrorInfo, InferenceReply, LastProviderError


@dataclass(frozen=True, slots=True)
class RequestIds:
    """Who a delivery is about, as far as it could be read (a malformed body may lack any of these)."""

    request_id: str | None
    tenant_id: str | None
    task: str | None


@dataclass(frozen=True, slots=True)
class DeliveryContext:
    """What the broker delivery tells handling beyond the request body."""

    attempts: int  # provider attempts already made, from our header
    received_at: datetime
    received_monotonic: float
    first_failure_at: datetime | None = None  # when this request first failed, from our header
    last_error: LastProviderError | None = None  # the provider's last real error for it, from our headers
    settle_seq: int = 0  # times a worker put it back on the ladder, from our header
    redeliveries: int = 0  # broker redeliveries in its history, this delivery's included
    history: tuple[AttemptRecord, ...] = ()  # its failed tries so far, from our header
    body_bytes: int = 0  # the request body's size, which bounds how long its prompt takes to render


class MalformedCode(StrEnum):
    """Why a delivery is not handled at all; the code of its rejection reply and dead letter."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_TASK = "unknown_task"
    BODY_TOO_LARGE = "body_too_large"
    PUBLISHER_REFUSED = "publisher_refused"


@dataclass(frozen=True, slots=True)
class Malformed:
    """A delivery the worker will not handle (not a valid request, or refused by the publisher rules); what we
    could still read helps the publisher match the rejection."""

    code: MalformedCode
    message: str
    request_id: str | None = None
    tenant_id: str | None = None
    task: str | None = None


class DeadLetterReason(StrEnum):
    """Every reason the worker dead-letters for (the `atlas-reason` header and the metrics' `reason` label)."""

    MALFORMED = "malformed"
    PUBLISHER_REFUSED = "publisher_refused"
    TENANT_CONFIG_INVALID = "tenant_config_invalid"
    EXPIRED = "expired"
    EXHAUSTED = "exhausted"
    PERMANENT_ERROR = "permanent_error"
    CIRCUIT_OPEN = "circuit_open"
    INTERNAL_ERROR = "internal_error"
    REPLY_UNROUTABLE = "reply_unroutable"
    REROUTE_UNROUTABLE = "reroute_unroutable"


# Metrics count these and fold anything else into `other`.
DEAD_LETTER_REASONS: Final = frozenset(r.value for r in DeadLetterReason)


class SettleResult(StrEnum):
    """What settling an outcome did (logs, metrics' `result` label, the settle span)."""

    REPLIED = "replied"
    REPLIED_AND_DEAD_LETTERED = "replied+dead_lettered"
    DEAD_LETTERED = "dead_lettered"
    RETRIED = "retried"
    CIRCUIT_WAIT = "circuit_wait"
    DEFERRED = "deferred"
    REROUTED = "rerouted"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Park the original message on `{ns}.dead` for an operator, with the reason in headers."""

    reason: DeadLetterReason
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

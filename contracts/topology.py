"""Broker names derived from a namespace, and the AMQP header names the worker reads and writes."""

from dataclasses import dataclass
from typing import Final

DEFAULT_NAMESPACE: Final = "inference"
DEFAULT_ATLAS_CLOUD_EXCHANGE: Final = "atlas.cloud"
REQUEST_ROUTING_KEY: Final = "request"


@dataclass(frozen=True)
class Topology:
    """Every exchange and queue name for one namespace (`--namespace`)."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def requests(self) -> str:
        """The requests exchange (direct) and its quorum queue share this name."""
        return f"{self.namespace}.requests"

    @property
    def retry(self) -> str:
        """The retry exchange (direct); each delay level is a queue bound with its level number."""
        return f"{self.namespace}.retry"

    def retry_queue(self, level: int) -> str:
        return f"{self.namespace}.retry.{level}"

    @property
    def replies(self) -> str:
        """The replies exchange (topic) and the durable queue bound to `#`."""
        return f"{self.namespace}.replies"

    @property
    def dead(self) -> str:
        """The dead-letter exchange (fanout) and its queue."""
        return f"{self.namespace}.dead"

    @staticmethod
    def reply_routing_key(tenant_id: str | None, task: str | None) -> str:
        return f"{tenant_id or 'unknown'}.{task or 'unknown'}"


class Header:
    """AMQP header names. Ours never start with `x-`: RabbitMQ 4 stops interpreting client `x-` headers."""

    ATTEMPTS: Final = "atlas-attempts"  # provider attempts already made for this request
    DEFERRALS: Final = "atlas-deferrals"  # times the request was deferred by a tenant's concurrency limit
    TENANT_ID: Final = "atlas-tenant-id"
    REQUEST_ID: Final = "atlas-request-id"
    TASK: Final = "atlas-task"
    PROVIDER_KIND: Final = "atlas-provider-kind"
    REASON: Final = "atlas-reason"  # why a message was dead-lettered or rerouted
    ERROR_CODE: Final = "atlas-error-code"
    ERROR_CLASS: Final = "atlas-error-class"
    ERROR_MESSAGE: Final = "atlas-error-message"
    FIRST_FAILURE_AT: Final = "atlas-first-failure-at"
    LAST_FAILURE_AT: Final = "atlas-last-failure-at"
    DEAD_LETTERED_AT: Final = "atlas-dead-lettered-at"
    ORIGINAL_EXCHANGE: Final = "atlas-original-exchange"
    ORIGINAL_ROUTING_KEY: Final = "atlas-original-routing-key"
    REROUTED_FROM_TENANT: Final = "atlas-rerouted-from-tenant"
    REROUTED_AT: Final = "atlas-rerouted-at"
    RETRY_LEVEL: Final = "atlas-retry-level"
    REDACTED: Final = "atlas-redacted"  # true on a dead letter whose body had secrets masked before it was parked
    REPLAYS: Final = "atlas-replays"  # times `dlq replay` sent this request back
    REPLAYED_AT: Final = "atlas-replayed-at"
    DEAD_LETTER_ID: Final = "atlas-dead-letter-id"  # assigned by the worker; what `dlq` calls a dead letter's id
    SIGNATURE: Final = "atlas-signature"  # the worker's HMAC over its own headers, when a header key is set
    HEADERS_DROPPED: Final = "atlas-headers-dropped"  # publisher headers left off a copy to keep it in one frame
    BODY_TRUNCATED: Final = "atlas-body-truncated"  # the copy carries only a prefix of an oversized body
    ORIGINAL_BODY_BYTES: Final = "atlas-original-body-bytes"  # the oversized body's size
    SETTLE_SEQ: Final = "atlas-settle-seq"  # times a worker put this request back on the ladder (any reason)
    REDELIVERIES: Final = "atlas-redeliveries"  # broker redeliveries in this copy's history
    CIRCUIT_WAITS: Final = "atlas-circuit-waits"  # times an open circuit parked the request without a call
    LAST_PROVIDER_ERROR_CODE: Final = "atlas-last-provider-error-code"  # beside a circuit_open dead letter
    LAST_PROVIDER_ERROR_MESSAGE: Final = "atlas-last-provider-error-message"
    HISTORY: Final = "atlas-history"  # compact JSON: the request's last failed tries (worker.handling.history)

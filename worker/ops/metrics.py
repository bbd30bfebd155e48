"""Prometheus metrics for one worker, on a registry of its own, fed from each settled delivery."""

from collections.abc import Callable, Collection
from typing import Final, get_args
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from contracts import ProviderSettings, Status, Task
from worker.broker.consumer import Settled
from worker.errors import ErrorClass
from worker.handling.outcome import DEAD_LETTER_REASONS, DeadLetterReason, Defer, Reply, Reroute, Retry, SettleResult
from worker.ops.genai_metrics import GenAIMetrics
from worker.ops.labelled import Labelled

OTHER_TENANT: Final = "other"
OTHER: Final = "other"  # any label value outside its closed set
NONE: Final = "none"
# Every label value comes from a closed set: a value a publisher made up (a task string in a malformed
# message, say) becomes `other` instead of a new series.
TASKS: Final = frozenset(t.value for t in Task)
STATUSES: Final = frozenset(s.value for s in Status)
_PROVIDER_MODELS = get_args(get_args(ProviderSettings)[0])  # the members of the Annotated union
PROVIDER_KINDS: Final = frozenset(get_args(model.model_fields["kind"].annotation)[0] for model in _PROVIDER_MODELS)
# A circuit wait is no result of its own on this counter: it is counted as `other`.
RESULTS: Final = frozenset(r.value for r in SettleResult if r is not SettleResult.CIRCUIT_WAIT)
REROUTE_REASONS: Final = frozenset({"no_byoc_config", *(c.value for c in ErrorClass)})
BREAKER_STATES: Final = ("closed", "open", "half_open")
# Seconds; LLM calls run from well under a second (summaries on small models) to minutes (large RCAs).
LATENCY_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """Every metric the worker exports. `tenant_known` decides which tenant ids may become label values:
    ids with a configuration file are operator-controlled and few; any other id collapses to `other`."""

    def __init__(self, tenant_known: Callable[[str], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._tenant_known = tenant_known
        r = self.registry
        self.settled = Counter(
            "atlas_worker_settled",
            "Deliveries settled, by what was done, reply status, task, provider kind and tenant.",
            ["result", "status", "task", "provider_kind", "tenant"],
            registry=r,
        )
        self.provider_latency = Histogram(
            "atlas_worker_provider_latency_seconds",
            "Time the tenant's provider took to answer, for requests that got a reply.",
            ["provider_kind", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "atlas_worker_retries", "Requests parked on a retry level.", ["level", "tenant"], registry=r
        )
        self.reroutes = Counter(
            "atlas_worker_reroutes",
            "Requests republished to the Atlas Cloud exchange (their data left the tenant's network).",
            ["reason", "tenant"],
            registry=r,
        )
        self.dead_letters = Counter(
            "atlas_worker_dead_letters",
            "Requests the worker dead-lettered, by reason (broker delivery-limit dead letters are not counted here).",
            ["reason", "tenant"],
            registry=r,
        )
        self.unroutable = Counter(
            "atlas_worker_unroutable",
            "Replies or reroutes the broker returned because nothing was bound to receive them.",
            ["kind"],
            registry=r,
        )
        self.tokens = Counter(
            "atlas_worker_tokens",
            "Tokens counted by the tenant's provider.",
            ["direction", "provider_kind", "tenant"],
            registry=r,
        )
        self.breaker = Gauge(
            "atlas_worker_breaker_state",
            "Circuit breaker per tenant endpoint: 1 on the current state's series, 0 on the others.",
            ["tenant", "endpoint", "state"],
            registry=r,
        )
        self._declare_worker_state(r)
        self.genai = GenAIMetrics(r)  # observed per model call, by the provider guard
        for kind in ("reply", "reroute"):
            self.unroutable.labels(kind)  # present at 0 from the start, so `increase()` sees the first one
        self.loop_lag = loop_lag_histogram(r)
        # The children `observe` touches on every settled delivery.
        self._settled = Labelled(self.settled)
        self._provider_latency = Labelled(self.provider_latency)
        self._tokens = Labelled(self.tokens)

    def _declare_worker_state(self, r: CollectorRegistry) -> None:
        """Gauges of the worker's own state, read at scrape time, and the tenant source's faults."""
        self.in_flight = Gauge("atlas_worker_in_flight", "Deliveries being handled right now.", registry=r)
        self.consuming = Gauge("atlas_worker_consuming", "1 while this worker consumes the requests queue.", registry=r)
        self.ready = Gauge("atlas_worker_ready", "1 while /readyz answers 200.", registry=r)
        self.tenants = Gauge("atlas_worker_tenants_loaded", "Tenant configurations loaded.", registry=r)
        self.tenants_quarantined = Gauge(
            "atlas_worker_tenants_quarantined",
            "Tenants whose file exists but never validated: their requests fail with tenant_config_invalid.",
            registry=r,
        )
        self.tenants_stale = Gauge(
            "atlas_worker_tenants_stale",
            "Tenants served from their last good config because their file no longer validates: the file's "
            "edit is not in force.",
            registry=r,
        )
        self.tenant_source_healthy = Gauge(
            "atlas_worker_tenant_source_healthy",
            "1 while the tenants directory can be trusted; 0 while it is faulty and the worker does not consume.",
            registry=r,
        )
        self.tenant_source_faults = Counter(
            "atlas_worker_tenant_source_faults",
            "Times the tenant source was found faulty (missing, unlistable, emptied at once) or its watch failed.",
            registry=r,
        )

    def tenant(self, tenant_id: str | None) -> str:
        return tenant_id if tenant_id and self._tenant_known(tenant_id) else OTHER_TENANT

    def observe(self, settled: Settled) -> None:
        """Count one settled delivery. Called on the hot path: label lookups and increments only."""
        tenant = self.tenant(settled.ids.tenant_id)
        outcome = settled.outcome
        task = closed(settled.ids.task, TASKS)
        status = NONE
        provider_kind = NONE
        match outcome:
            case Reply(reply=reply, dead_letter=dead):
                if reply is not None:
                    status = closed(reply.status.value, STATUSES)
                    provider_kind = closed(reply.provenance.provider_kind, PROVIDER_KINDS)
                    if reply.timings.provider_ms > 0:
                        self._provider_latency(provider_kind, task).observe(reply.timings.provider_ms / 1000)
                    usage = reply.usage
                    if usage.input_tokens:
                        self._tokens("input", provider_kind, tenant).inc(usage.input_tokens)
                    if usage.output_tokens:
                        self._tokens("output", provider_kind, tenant).inc(usage.output_tokens)
                elif dead is not None:
                    provider_kind = closed(dead.provider_kind, PROVIDER_KINDS)
                if dead is not None:
                    self.dead_letters.labels(closed(dead.reason, DEAD_LETTER_REASONS), tenant).inc()
                if reply is not None and settled.done is SettleResult.DEAD_LETTERED:
                    # The reply came back unroutable; when the request had no dead letter of its own, the
                    # settler parked it with reason reply_unroutable.
                    self.unroutable.labels("reply").inc()
                    if dead is None:
                        self.dead_letters.labels(DeadLetterReason.REPLY_UNROUTABLE, tenant).inc()
            case Retry(level=level, provider_kind=kind, refused_by_circuit=waiting):
                provider_kind = closed(kind, PROVIDER_KINDS)
                if not waiting:  # a wait for an open circuit's probe is no retry of a provider call
                    self.retries.labels(str(level), tenant).inc()
            case Reroute(reason=reason, provider_kind=kind):
                provider_kind = closed(kind, PROVIDER_KINDS)
                if settled.done is SettleResult.REROUTED:
                    self.reroutes.labels(closed(reason, REROUTE_REASONS), tenant).inc()
                else:
                    self.unroutable.labels("reroute").inc()
                    self.dead_letters.labels(DeadLetterReason.REROUTE_UNROUTABLE, tenant).inc()
            case Defer():
                pass
        self._settled(closed(settled.done, RESULTS), status, task, provider_kind, tenant).inc()

    def breaker_state(self, tenant_id: str, endpoint: str, state: str) -> None:
        """Record a circuit breaker's new state (`closed`, `open` or `half_open`) for a tenant's endpoint."""
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}; expected one of {BREAKER_STATES}")
        tenant, where = self.tenant(tenant_id), endpoint_label(endpoint)
        for candidate in BREAKER_STATES:
            self.breaker.labels(tenant, where, candidate).set(1 if candidate == state else 0)


def closed(value: str | None, allowed: Collection[str]) -> str:
    """`value` if it is one of `allowed`, `none` when absent, else `other`."""
    if not value:
        return NONE
    return value if value in allowed else OTHER


def endpoint_label(endpoint: str) -> str:
    """scheme://host[:port]/path: no user info and no query string, which is where credentials hide."""
    parts = urlsplit(endpoint)
    if not parts.scheme or not parts.hostname:
        return endpoint.split("?", 1)[0].rsplit("@", 1)[-1]
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


# Event-loop responsiveness. Seconds: a healthy loop answers within a millisecond or two; anything past 0.1 s
# delays every tenant's messages, acks and heartbeats at once.
LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def loop_lag_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "atlas_worker_event_loop_lag_seconds",
        "How late the event loop woke a timer: the time it spent busy with something else.",
        buckets=LOOP_LAG_BUCKETS,
        registry=registry,
    )

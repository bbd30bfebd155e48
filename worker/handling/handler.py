"""Request → outcome: tenant lookup, deadline, prompt, provider call, result validation. Knows no AMQP."""

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from contracts import (
    AttemptRecord,
    ErrorInfo,
    InferenceReply,
    InferenceRequest,
    LastProviderError,
    Provenance,
    ReplyResult,
    Status,
    Task,
    TenantConfig,
    Timings,
    Usage,
)
from worker.connection_check.task import answer_test_connection
from worker.errors import ErrorClass, ProviderError
from worker.handling import history
from worker.handling.cost import priced_usage
from worker.handling.ladder import RetryLadder
from worker.handling.outcome import DeadLetter, Defer, Outcome, Reply, Reroute, Retry
from worker.handling.policy import Action, Decision, decide, decide_refused
from worker.prompting import budget
from worker.prompting.prompts import REPAIR_VERSION, PreparedCall, build_call, repair_call
from worker.prompting.results import TaskFailure, explain_provider_error, interpret
from worker.providers.base import ModelCall, ModelResult
from worker.providers.bounded import CIRCUIT_OPEN, GuardedProvider
from worker.providers.egress import EgressPolicy
from worker.providers.pool import ProviderPool
from worker.tenants import ConfigProblem
from worker.tracing import NO_TRACING, Tracing

log = structlog.get_logger("worker.handling.handler")


class TenantLookup(Protocol):
    """What the handler needs from the tenant registry."""

    def get(self, tenant_id: str) -> TenantConfig | None: ...

    def problems(self, tenant_id: str) -> Sequence[ConfigProblem] | None: ...

    def case_variant(self, tenant_id: str) -> str | None: ...

    @property
    def healthy(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class DeliveryContext:
    """What the broker delivery tells the handler beyond the request body."""

    attempts: int  # provider attempts already made, from our header
    received_at: datetime
    received_monotonic: float
    first_failure_at: datetime | None = None  # when this request first failed, from our header
    last_error: LastProviderError | None = None  # the provider's last real error for it, from our headers
    settle_seq: int = 0  # times a worker put it back on the ladder, from our header
    redeliveries: int = 0  # broker redeliveries in its history, this delivery's included
    history: tuple[AttemptRecord, ...] = ()  # its failed tries so far, from our header


@dataclass(slots=True)
class _Call:
    tenant: TenantConfig
    request: InferenceRequest
    ctx: DeliveryContext
    prompt_version: str | None = None
    provider_ms: float = 0.0
    # Summed over the provider calls behind one reply (a repair or a context-overflow retry adds one).
    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0
    model: str | None = None
    repaired: bool = False
    prepared: PreparedCall | None = None

    def usage(self) -> Usage:
        return priced_usage(self.input_tokens, self.output_tokens, self.tenant.pricing)


# Test Connection probes of a tenant without a stored configuration (a draft in the message) share this cap.
PROBES_PER_UNCONFIGURED_TENANT = 2
# Probes in flight across all tenants: tenant ids in messages are the publisher's to choose, so without a
# worker-wide cap a flood of distinct ids could still fill every prefetched delivery with hanging probes.
PROBES_IN_FLIGHT = 8


class TenantSlots:
    """Per-tenant count of provider calls and probes in flight, capped by `limits.max_concurrency`."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._probes = 0

    def try_acquire(self, tenant: TenantConfig) -> bool:
        return self._take(tenant.tenant_id, tenant.limits.max_concurrency)

    def release(self, tenant: TenantConfig) -> None:
        self._give(tenant.tenant_id)

    def try_acquire_probe(self, tenant_id: str, limit: int) -> bool:
        """A Test Connection probe takes one of the tenant's slots, and one of the worker's few probe slots."""
        if self._probes >= PROBES_IN_FLIGHT or not self._take(tenant_id, limit):
            return False
        self._probes += 1
        return True

    def release_probe(self, tenant_id: str) -> None:
        self._probes -= 1
        self._give(tenant_id)

    def _take(self, key: str, limit: int) -> bool:
        used = self._in_flight.get(key, 0)
        if used >= limit:
            return False
        self._in_flight[key] = used + 1
        return True

    def _give(self, key: str) -> None:
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
        else:
            del self._in_flight[key]  # publisher-chosen tenant ids must not accumulate


class Handler:
    def __init__(
        self,
        tenants: TenantLookup,
        providers: ProviderPool,
        ladder: RetryLadder,
        slots: TenantSlots | None = None,
        draft_egress: EgressPolicy | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._tenants = tenants
        self._tracing = tracing
        self._draft_egress = draft_egress or EgressPolicy(drafts=True)
        self._providers = providers
        self._ladder = ladder
        self._slots = slots or TenantSlots()

    async def handle(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        if request.task is Task.TEST_CONNECTION:
            return await self._probe(request, ctx)
        tenant = self._tenants.get(request.tenant_id)
        if tenant is None:
            return self._without_config(request, ctx)
        if request.deadline is not None and request.deadline <= datetime.now(UTC):
            error = ErrorInfo(code="deadline_exceeded", message="the request's deadline passed before it was handled")
            reply = _reply(request, ctx, Status.EXPIRED, error=error, tenant=tenant)
            dead = DeadLetter("expired", error, tenant.provider.kind, ctx.attempts) if ctx.attempts else None
            return Reply(reply, dead)
        if not self._slots.try_acquire(tenant):
            return Defer()
        try:
            return await self._call(_Call(tenant, request, ctx))
        finally:
            self._slots.release(tenant)

    async def _probe(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        """Test Connection, counted against the tenant's concurrency like any request: a flood of probes at a
        hanging endpoint is deferred instead of holding every delivery the worker has prefetched."""
        tenant = self._tenants.get(request.tenant_id)
        limit = tenant.limits.max_concurrency if tenant else PROBES_PER_UNCONFIGURED_TENANT
        if not self._slots.try_acquire_probe(request.tenant_id, limit):
            return Defer()
        try:
            return await answer_test_connection(request, ctx, self._tenants, self._providers, self._draft_egress)
        finally:
            self._slots.release_probe(request.tenant_id)

    def _without_config(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        """No loaded config: Atlas Cloud serves the tenant only when the healthy source truly holds none for it."""
        if (problems := self._tenants.problems(request.tenant_id)) is not None:
            # Field and reason only: the file's path is the operator's business, and no problem quotes a secret.
            why = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems[:3])
            error = ErrorInfo(
                code="tenant_config_invalid",
                message=f"the tenant's configuration file does not validate ({why}); fix it and replay",
            )
            reply = _reply(request, ctx, Status.FAILED, error=error)
            return Reply(reply, DeadLetter("tenant_config_invalid", error, attempts=ctx.attempts))
        if (configured := self._tenants.case_variant(request.tenant_id)) is not None:
            error = ErrorInfo(
                code="tenant_id_case_mismatch",
                message=f"tenant_id {request.tenant_id!r} differs only in letter case from the configured "
                f"tenant {configured!r}; tenant ids are case-sensitive",
            )
            reply = _reply(request, ctx, Status.REJECTED, error=error)
            return Reply(reply, DeadLetter("malformed", error, attempts=ctx.attempts))
        if not self._tenants.healthy:
            # The source cannot be read: whether this tenant has a config is unknown, so it waits on the ladder
            # (no attempt spent) rather than being rerouted. Consumption pauses too; this covers the race.
            return Defer()
        return Reroute(reason="no_byoc_config")

    async def _call(self, call: _Call) -> Outcome:
        tenant, request = call.tenant, call.request
        try:
            call.prepared = await _prepare(request, tenant)
            call.prompt_version = call.prepared.prompt_version
            provider = self._providers.get(tenant)  # bounded by the tenant's timeout, behind its breaker
            result = await self._complete_fitted(provider, call)
            return await self._answer(provider, call, result)
        except TaskFailure as failure:
            return self._task_failed(call, failure)
        except ProviderError as exc:
            return self._failed(call, explain_provider_error(request, exc))

    async def _complete(self, provider: GuardedProvider, call: _Call, model_call: ModelCall) -> ModelResult:
        started = time.monotonic()
        try:
            result = await provider.complete(
                model_call, subject=call.request.request_id, failed_before=call.ctx.attempts > 0
            )
        except ProviderError as exc:
            if exc.code != CIRCUIT_OPEN:  # an open circuit refuses before anything is sent
                call.model_calls += 1
            raise
        finally:
            call.provider_ms += (time.monotonic() - started) * 1000
        call.model_calls += 1
        call.input_tokens += result.input_tokens
        call.output_tokens += result.output_tokens
        call.model = result.model or call.model
        return result

    async def _complete_fitted(self, provider: GuardedProvider, call: _Call) -> ModelResult:
        """The call; after a context overflow, exactly one more with a tighter budget, if that changes the call."""
        assert call.prepared is not None
        first = call.prepared
        try:
            return await self._complete(provider, call, first.call)
        except ProviderError as exc:
            if exc.error_class is not ErrorClass.CONTEXT_OVERFLOW:
                raise
            tighter = budget.tighter(first.budget, exc.message)
            smaller = await _prepare(call.request, call.tenant, tighter)
            if smaller.call == first.call:
                raise  # nothing left to trim: the overflow stands
            log.info("context_overflow_retry", prompt_budget_tokens=smaller.budget.prompt_tokens)
            call.prepared = smaller
            return await self._complete(provider, call, smaller.call)

    async def _answer(self, provider: GuardedProvider, call: _Call, result: ModelResult) -> Outcome:
        """Validate the answer; an RCA with invalid or truncated JSON gets exactly one repair attempt."""
        assert call.prepared is not None
        prepared = call.prepared
        try:
            return self._ok(call, await _interpret(call.request, result, prepared.citable))
        except TaskFailure as failure:
            if not (failure.repairable and call.request.task is Task.RCA):
                raise
            first = failure
        log.info("repair_attempt", code=first.code)
        truncated = first.code == "truncated_output"
        repair = repair_call(prepared, first.raw_output, first.message, truncated=truncated)
        call.repaired = True
        call.prompt_version = f"{prepared.prompt_version}+{REPAIR_VERSION}"
        result = await self._complete(provider, call, repair)
        return self._ok(call, await _interpret(call.request, result, prepared.citable))

    def _ok(self, call: _Call, result: ReplyResult) -> Outcome:
        reply = _reply(
            call.request,
            call.ctx,
            Status.OK,
            result=result,
            tenant=call.tenant,
            attempts=call.ctx.attempts + 1,
            call=call,
        )
        return Reply(reply)

    def _task_failed(self, call: _Call, failure: TaskFailure) -> Outcome:
        """The model's answer is unusable (failed, raw output kept), or the request is (rejected, dead-lettered)."""
        error = ErrorInfo(code=failure.code, message=failure.message)
        log.info("task_failed", code=failure.code, repaired=call.repaired)
        attempts = call.ctx.attempts + (1 if call.model_calls else 0)
        reply = _reply(
            call.request,
            call.ctx,
            Status.REJECTED if failure.rejected else Status.FAILED,
            error=error,
            tenant=call.tenant,
            result=ReplyResult(raw_output=failure.raw_output) if failure.raw_output is not None else None,
            attempts=attempts,
            call=call,
        )
        dead = DeadLetter("malformed", error, call.tenant.provider.kind, attempts) if failure.rejected else None
        return Reply(reply, dead)

    def _failed(self, call: _Call, exc: ProviderError) -> Outcome:
        if exc.code == CIRCUIT_OPEN and not call.model_calls:
            return self._refused_by_circuit(call, exc)
        tenant, ctx = call.tenant, call.ctx
        attempts = ctx.attempts + 1
        decision = decide(
            exc.error_class,
            tenant.fallback.policy,
            attempts=attempts,
            max_attempts=tenant.fallback.max_attempts,
            time_left_s=_time_left_s(call.request),
            ladder=self._ladder,
            retry_after_s=exc.retry_after_s,
        )
        self._tracing.policy_decided(tenant.fallback.policy.value, exc.error_class.value, attempts, decision)
        error = ErrorInfo(
            code=exc.code,
            message=exc.message,
            error_class=exc.error_class.value,
            retry_after_s=exc.retry_after_s,
            stopped_because=decision.stopped_because,
        )
        log.info(
            "provider_failed",
            error_class=exc.error_class.value,
            code=exc.code,
            attempts_made=attempts,
            decision=decision.action.value,
            reason=decision.reason,
        )
        told = self._told(call, exc, decision, provider_called=True)
        if decision.action is Action.RETRY:
            assert decision.retry_level is not None
            delay = self._ladder.delays_s[decision.retry_level]
            return Retry(decision.retry_level, attempts, error, tenant.provider.kind, delay_s=delay, history=told)
        reason = (
            "exhausted" if exc.error_class in (ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED) else "permanent_error"
        )
        return self._ended(call, decision, error, attempts, reason, told)

    def _told(
        self, call: _Call, exc: ProviderError, decision: Decision, *, provider_called: bool
    ) -> tuple[AttemptRecord, ...]:
        """The request's history with this try added: the ladder level and when it is due back, if it is."""
        level = decision.retry_level if decision.action in (Action.RETRY, Action.WAIT) else None
        delay = self._ladder.delays_s[level] if level is not None else None
        entry = history.record(exc, provider_called=provider_called, level=level, delay_s=delay)
        return history.extended(call.ctx.history, entry)

    def _refused_by_circuit(self, call: _Call, exc: ProviderError) -> Outcome:
        """The circuit refused the call, so the provider was not called: no attempt is spent. Under
        queue_and_retry the request waits for the circuit's next probe while its deadline allows."""
        tenant, ctx = call.tenant, call.ctx
        wait_s = exc.retry_after_s or 0.0
        decision = decide_refused(
            tenant.fallback.policy,
            wait_s=wait_s,
            time_left_s=_time_left_s(call.request),
            patience_left_s=self._patience_left_s(call),
            ladder=self._ladder,
        )
        log.info(
            "circuit_refused",
            endpoint=self._providers.get(tenant).endpoint,
            next_probe_in_s=round(wait_s, 3),
            attempts_made=ctx.attempts,
            decision=decision.action.value,
            reason=decision.reason,
        )
        told = self._told(call, exc, decision, provider_called=False)
        if decision.action is Action.WAIT:
            assert decision.retry_level is not None
            delay = self._ladder.delays_s[decision.retry_level]
            error = ErrorInfo(code=exc.code, message=exc.message, error_class=exc.error_class.value)
            return Retry(
                decision.retry_level,
                ctx.attempts,
                error,
                tenant.provider.kind,
                refused_by_circuit=True,
                delay_s=delay,
                history=told,
            )
        return self._ended(
            call, decision, _refusal_error(exc, decision, ctx.last_error), ctx.attempts, CIRCUIT_OPEN, told
        )

    def _ended(
        self,
        call: _Call,
        decision: Decision,
        error: ErrorInfo,
        attempts: int,
        reason: str,
        told: tuple[AttemptRecord, ...],
    ) -> Outcome:
        """A decision that ends the request here: reroute, or reply (and dead-letter when it says so)."""
        kind = call.tenant.provider.kind
        if decision.action is Action.REROUTE:
            return Reroute(reason=error.error_class or reason, error=error, provider_kind=kind, attempts=attempts)
        assert decision.status is not None
        reply = _reply(
            call.request,
            call.ctx,
            decision.status,
            error=error,
            tenant=call.tenant,
            attempts=attempts,
            call=call,
            told=told,
        )
        dead = None
        if decision.dead_letter:
            reason = "expired" if decision.status is Status.EXPIRED else reason
            dead = DeadLetter(reason, error, kind, attempts, history=told)
        return Reply(reply, dead)

    def _patience_left_s(self, call: _Call) -> float:
        """What remains of the time the request's attempts could take on the ladder, from its first failure
        (or now, if this refusal is its first): a request with no deadline waits for a circuit that long."""
        patience = self._ladder.span_s(call.tenant.fallback.max_attempts)
        first = call.ctx.first_failure_at
        waited = (datetime.now(UTC) - first).total_seconds() if first is not None else 0.0
        return patience - waited


def _refusal_error(exc: ProviderError, decision: Decision, last: LastProviderError | None) -> ErrorInfo:
    """The final error of a request an open circuit refused: the provider's last real error leads, when an
    earlier try met one, and `stopped_because` says that the circuit ended the retrying."""
    refused = f"not tried: {exc.message}, which is past {decision.reason}"
    if last is None:
        return ErrorInfo(
            code=exc.code,
            message=refused,
            error_class=exc.error_class.value,
            retry_after_s=exc.retry_after_s,
            stopped_because=decision.stopped_because,
        )
    return ErrorInfo(
        code=last.code,
        message=f"{last.message}; then {refused}",
        error_class=last.error_class,
        retry_after_s=exc.retry_after_s,
        last_provider_error=last,
        stopped_because=decision.stopped_because,
    )


def _time_left_s(request: InferenceRequest) -> float | None:
    if request.deadline is None:
        return None
    return (request.deadline - datetime.now(UTC)).total_seconds()


def _reply(
    request: InferenceRequest,
    ctx: DeliveryContext,
    status: Status,
    *,
    result: ReplyResult | None = None,
    error: ErrorInfo | None = None,
    tenant: TenantConfig | None = None,
    attempts: int | None = None,
    call: _Call | None = None,
    told: tuple[AttemptRecord, ...] | None = None,
) -> InferenceReply:
    """The reply; `call` supplies what the provider calls did (usage, model, prompt, budget, trimming)."""
    now = datetime.now(UTC)
    provider = tenant.provider if tenant else None
    prepared = call.prepared if call else None
    return InferenceReply(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        task=request.task.value,
        status=status,
        result=result,
        usage=call.usage() if call else Usage(),
        provenance=Provenance(
            provider_kind=provider.kind if provider else None,
            model=(call.model if call else None) or (_configured_model(tenant) if tenant else None),
            attempts=attempts if attempts is not None else ctx.attempts,
            policy=tenant.fallback.policy.value if tenant else None,
            # The policy changed this request's course: it came back from the ladder, or fail_closed answered.
            fallback_used=ctx.attempts > 0 or status is Status.UNAVAILABLE,
            prompt_version=call.prompt_version if call else None,
            trimmed=prepared.trimmed if prepared else {},
            model_calls=call.model_calls if call else 0,
            repaired=call.repaired if call else False,
            context_window=prepared.budget.context_window if prepared else None,
            prompt_budget_tokens=prepared.budget.prompt_tokens if prepared else None,
            settle_seq=ctx.settle_seq,
            redeliveries=ctx.redeliveries,
            history=list(told if told is not None else ctx.history) if status is not Status.OK else [],
        ),
        timings=Timings(
            received_at=ctx.received_at,
            replied_at=now,
            provider_ms=round(call.provider_ms if call else 0.0, 3),
            total_ms=round((time.monotonic() - ctx.received_monotonic) * 1000, 3),
        ),
        error=error,
    )


# Incidents bigger than this are fitted off the event loop; smaller ones cost less than the thread hop.
LARGE_INCIDENT_ITEMS = 2000
LARGE_INCIDENT_LOG_CHARS = 200_000


async def _prepare(
    request: InferenceRequest, tenant: TenantConfig, fitted: budget.Budget | None = None
) -> PreparedCall:
    incident = request.incident
    large = False
    if incident is not None:
        items = len(incident.logs) + len(incident.timeline) + sum(len(m.points) for m in incident.metrics)
        large = (
            items > LARGE_INCIDENT_ITEMS or sum(len(line.message) for line in incident.logs) > LARGE_INCIDENT_LOG_CHARS
        )
    if large or _declares_tools(request):
        return await asyncio.to_thread(build_call, request, tenant, fitted)
    return build_call(request, tenant, fitted)


async def _interpret(
    request: InferenceRequest, result: ModelResult, citable: Mapping[str, frozenset[int]] | None
) -> ReplyResult:
    if _declares_tools(request):
        return await asyncio.to_thread(interpret, request, result, citable)
    return interpret(request, result, citable)


def _declares_tools(request: InferenceRequest) -> bool:
    """A runbook with the publisher's own tool schemas: checking them and validating arguments against them runs
    off the event loop, within `prompting.tool_schemas`' time budget (the platform's default tools are small, fixed
    and checked by the tests)."""
    return request.task is Task.RUNBOOK and bool(request.tools)


def _configured_model(tenant: TenantConfig) -> str | None:
    settings = tenant.provider
    for name in ("model", "deployment", "model_id"):
        value = getattr(settings, name, None)
        if isinstance(value, str):
            return value
    return None

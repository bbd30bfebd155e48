"""The model-call path of one request: prompt, provider call, context-overflow retry, repair, the policy's verdict."""

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from contracts import (
    AttemptRecord,
    ErrorInfo,
    InferenceRequest,
    LastProviderError,
    ReplyResult,
    Status,
    Task,
    TenantConfig,
    Usage,
)
from worker.errors import CircuitOpen, ErrorClass, ProviderError
from worker.handling import history, replies
from worker.handling.cost import priced_usage
from worker.handling.ladder import RetryLadder
from worker.handling.outcome import DeadLetter, DeadLetterReason, DeliveryContext, Outcome, Reply, Reroute, Retry
from worker.handling.policy import Action, Decision, decide, decide_refused
from worker.prompting import budget
from worker.prompting.prompts import REPAIR_VERSION, PreparedCall, build_call, repair_call
from worker.prompting.results import TaskFailure, TaskFailureCode, explain_provider_error, interpret
from worker.providers.base import ModelCall, ModelResult
from worker.providers.bounded import GuardedProvider
from worker.providers.pool import ProviderPool
from worker.tracing import NO_TRACING, Tracing

log = structlog.get_logger("worker.handling.handler")


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


class Handler:
    """Answers one request of a configured tenant with its provider, or says what the fallback policy decided."""

    def __init__(self, providers: ProviderPool, ladder: RetryLadder, tracing: Tracing = NO_TRACING) -> None:
        self._tracing = tracing
        self._providers = providers
        self._ladder = ladder

    async def handle(self, tenant: TenantConfig, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        return await self._call(_Call(tenant, request, ctx))

    async def _call(self, call: _Call) -> Outcome:
        tenant, request = call.tenant, call.request
        try:
            call.prepared = await _prepare(request, tenant, call.ctx)
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
            if not isinstance(exc, CircuitOpen):  # an open circuit refuses before anything is sent
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
            smaller = await _prepare(call.request, call.tenant, call.ctx, tighter)
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
        truncated = first.code is TaskFailureCode.TRUNCATED_OUTPUT
        repair = repair_call(prepared, first.raw_output, first.message, truncated=truncated)
        call.repaired = True
        call.prompt_version = f"{prepared.prompt_version}+{REPAIR_VERSION}"
        result = await self._complete(provider, call, repair)
        return self._ok(call, await _interpret(call.request, result, prepared.citable))

    def _ok(self, call: _Call, result: ReplyResult) -> Outcome:
        attempts = call.ctx.attempts + 1
        return Reply(
            replies.answer(
                call.request, call.ctx, Status.OK, result=result, tenant=call.tenant, calls=call, attempts=attempts
            )
        )

    def _task_failed(self, call: _Call, failure: TaskFailure) -> Outcome:
        """The model's answer is unusable (failed, raw output kept), or the request is (rejected, dead-lettered)."""
        error = ErrorInfo(code=failure.code, message=failure.message)
        log.info("task_failed", code=failure.code, repaired=call.repaired)
        attempts = call.ctx.attempts + (1 if call.model_calls else 0)
        reply = replies.answer(
            call.request,
            call.ctx,
            Status.REJECTED if failure.rejected else Status.FAILED,
            error=error,
            tenant=call.tenant,
            result=ReplyResult(raw_output=failure.raw_output) if failure.raw_output is not None else None,
            attempts=attempts,
            calls=call,
        )
        dead = None
        if failure.rejected:
            dead = DeadLetter(DeadLetterReason.MALFORMED, error, call.tenant.provider.kind, attempts)
        return Reply(reply, dead)

    def _failed(self, call: _Call, exc: ProviderError) -> Outcome:
        if isinstance(exc, CircuitOpen) and not call.model_calls:
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
        return self._carry_out(call, exc, decision, error)

    def _refused_by_circuit(self, call: _Call, exc: CircuitOpen) -> Outcome:
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
            attempts=ctx.attempts,
        )
        log.info(
            "circuit_refused",
            endpoint=self._providers.get(tenant).endpoint,
            next_probe_in_s=round(wait_s, 3),
            attempts_made=ctx.attempts,
            decision=decision.action.value,
            reason=decision.reason,
        )
        if decision.action is Action.WAIT:
            error = ErrorInfo(code=exc.code, message=exc.message, error_class=exc.error_class.value)
        else:
            error = _refusal_error(exc, decision, ctx.last_error)
        return self._carry_out(call, exc, decision, error)

    def _carry_out(self, call: _Call, exc: ProviderError, decision: Decision, error: ErrorInfo) -> Outcome:
        """The policy's decision as an outcome: park on the ladder, reroute, or reply (and dead-letter)."""
        kind = call.tenant.provider.kind
        attempts = call.ctx.attempts + decision.costs_attempt
        told = self._told(call, exc, decision, provider_called=decision.costs_attempt)
        if decision.action in (Action.RETRY, Action.WAIT):
            assert decision.retry_level is not None
            delay = self._ladder.delays_s[decision.retry_level]
            waiting = not decision.costs_attempt
            return Retry(
                decision.retry_level, attempts, error, kind, refused_by_circuit=waiting, delay_s=delay, history=told
            )
        if decision.action is Action.REROUTE:
            # A refusal's final error may lead with an earlier error whose class went unrecorded.
            reason = error.error_class or CircuitOpen.CODE
            return Reroute(reason=reason, error=error, provider_kind=kind, attempts=attempts)
        assert decision.status is not None
        reply = replies.answer(
            call.request,
            call.ctx,
            decision.status,
            error=error,
            tenant=call.tenant,
            attempts=attempts,
            calls=call,
            told=told,
            fallback_used=decision.fallback_used,
        )
        dead = None
        if decision.dead_letter_reason is not None:
            dead = DeadLetter(decision.dead_letter_reason, error, kind, attempts, history=told)
        return Reply(reply, dead)

    def _told(
        self, call: _Call, exc: ProviderError, decision: Decision, *, provider_called: bool
    ) -> tuple[AttemptRecord, ...]:
        """The request's history with this try added: the ladder level and when it is due back, if it is."""
        level = decision.retry_level if decision.action in (Action.RETRY, Action.WAIT) else None
        delay = self._ladder.delays_s[level] if level is not None else None
        entry = history.record(exc, provider_called=provider_called, level=level, delay_s=delay)
        return history.extended(call.ctx.history, entry)

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


# Requests bigger than this are rendered off the event loop; smaller ones cost less than the thread hop. Measured
# on the worst shapes (thousands of tiny alerts or metric series): 16 KiB takes up to 6 ms, 64 KiB 90 ms.
PREPARE_ON_LOOP_BYTES = 16 * 1024


async def _prepare(
    request: InferenceRequest, tenant: TenantConfig, ctx: DeliveryContext, fitted: budget.Budget | None = None
) -> PreparedCall:
    # By the body's size, which bounds every list a publisher can fill (alerts, series, metadata, messages …).
    large = ctx.body_bytes > PREPARE_ON_LOOP_BYTES
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

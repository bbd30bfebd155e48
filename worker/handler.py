"""Request → outcome: tenant lookup, deadline, prompt, provider call, result validation. Knows no AMQP."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from contracts import (
    ErrorInfo,
    InferenceReply,
    InferenceRequest,
    Provenance,
    ReplyResult,
    Status,
    TenantConfig,
    Timings,
    Usage,
)
from worker.errors import ErrorClass, ProviderError
from worker.ladder import RetryLadder
from worker.outcome import DeadLetter, Defer, Outcome, Reply, Reroute, Retry
from worker.policy import Action, decide
from worker.prompts import build_call
from worker.providers import ProviderPool
from worker.providers.base import ModelResult
from worker.tasks import TaskFailure, interpret

log = structlog.get_logger("worker.handler")


class TenantLookup(Protocol):
    """What the handler needs from the tenant registry."""

    def get(self, tenant_id: str) -> TenantConfig | None: ...

    def problems(self, tenant_id: str) -> object | None: ...


@dataclass(frozen=True, slots=True)
class DeliveryContext:
    """What the broker delivery tells the handler beyond the request body."""

    attempts: int  # provider attempts already made, from our header
    received_at: datetime
    received_monotonic: float


@dataclass(slots=True)
class _Call:
    tenant: TenantConfig
    request: InferenceRequest
    ctx: DeliveryContext
    prompt_version: str | None = None
    provider_ms: float = 0.0


class TenantSlots:
    """Per-tenant count of provider calls in flight, capped by `limits.max_concurrency`."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}

    def try_acquire(self, tenant: TenantConfig) -> bool:
        used = self._in_flight.get(tenant.tenant_id, 0)
        if used >= tenant.limits.max_concurrency:
            return False
        self._in_flight[tenant.tenant_id] = used + 1
        return True

    def release(self, tenant: TenantConfig) -> None:
        self._in_flight[tenant.tenant_id] -= 1

    def in_flight(self, tenant_id: str) -> int:
        return self._in_flight.get(tenant_id, 0)


class Handler:
    def __init__(
        self,
        tenants: TenantLookup,
        providers: ProviderPool,
        ladder: RetryLadder,
        slots: TenantSlots | None = None,
    ) -> None:
        self._tenants = tenants
        self._providers = providers
        self._ladder = ladder
        self._slots = slots or TenantSlots()

    async def handle(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        tenant = self._tenants.get(request.tenant_id)
        if tenant is None:
            problems = self._tenants.problems(request.tenant_id)
            if problems is None:
                return Reroute(reason="no_byoc_config")
            error = ErrorInfo(
                code="tenant_config_invalid",
                message="the tenant's configuration file does not validate; fix it and replay",
            )
            reply = _reply(request, ctx, Status.FAILED, error=error)
            return Reply(reply, DeadLetter("tenant_config_invalid", error, attempts=ctx.attempts))
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

    async def _call(self, call: _Call) -> Outcome:
        tenant, request = call.tenant, call.request
        started = time.monotonic()
        try:
            prepared = build_call(request, tenant)
            call.prompt_version = prepared.prompt_version
            provider = self._providers.get(tenant)  # bounded by the tenant's timeout, behind its breaker
            result = await provider.complete(prepared.call)
            call.provider_ms = (time.monotonic() - started) * 1000
            return self._answer(call, result)
        except ProviderError as exc:
            call.provider_ms = (time.monotonic() - started) * 1000
            return self._failed(call, exc)

    def _answer(self, call: _Call, result: ModelResult) -> Outcome:
        usage = Usage(input_tokens=result.input_tokens, output_tokens=result.output_tokens)
        try:
            reply_result = interpret(call.request, result)
        except TaskFailure as failure:
            error = ErrorInfo(code=failure.code, message=failure.message)
            return Reply(
                _reply(
                    call.request,
                    call.ctx,
                    Status.FAILED,
                    error=error,
                    tenant=call.tenant,
                    result=ReplyResult(raw_output=failure.raw_output),
                    usage=usage,
                    model=result.model,
                    prompt_version=call.prompt_version,
                    attempts=call.ctx.attempts + 1,
                    provider_ms=call.provider_ms,
                )
            )
        return Reply(
            _reply(
                call.request,
                call.ctx,
                Status.OK,
                result=reply_result,
                usage=usage,
                tenant=call.tenant,
                model=result.model,
                prompt_version=call.prompt_version,
                attempts=call.ctx.attempts + 1,
                provider_ms=call.provider_ms,
            )
        )

    def _failed(self, call: _Call, exc: ProviderError) -> Outcome:
        tenant, ctx = call.tenant, call.ctx
        attempts = ctx.attempts + 1
        time_left = None
        if call.request.deadline is not None:
            time_left = (call.request.deadline - datetime.now(UTC)).total_seconds()
        decision = decide(
            exc.error_class,
            tenant.fallback.policy,
            attempts=attempts,
            max_attempts=tenant.fallback.max_attempts,
            time_left_s=time_left,
            ladder=self._ladder,
            retry_after_s=exc.retry_after_s,
        )
        error = ErrorInfo(
            code=exc.code, message=exc.message, error_class=exc.error_class.value, retry_after_s=exc.retry_after_s
        )
        kind = tenant.provider.kind
        log.info(
            "provider_failed",
            error_class=exc.error_class.value,
            code=exc.code,
            attempt=attempts,
            decision=decision.action.value,
            reason=decision.reason,
        )
        if decision.action is Action.RETRY:
            assert decision.retry_level is not None
            return Retry(decision.retry_level, attempts, error, kind)
        if decision.action is Action.REROUTE:
            return Reroute(reason=exc.error_class.value, error=error, provider_kind=kind, attempts=attempts)
        assert decision.status is not None
        reply = _reply(
            call.request,
            ctx,
            decision.status,
            error=error,
            tenant=tenant,
            attempts=attempts,
            prompt_version=call.prompt_version,
            provider_ms=call.provider_ms,
        )
        dead = None
        if decision.dead_letter:
            reason = {Status.EXPIRED: "expired"}.get(decision.status) or (
                "exhausted" if exc.error_class in (ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED) else "permanent_error"
            )
            dead = DeadLetter(reason, error, kind, attempts)
        return Reply(reply, dead)


def _reply(
    request: InferenceRequest,
    ctx: DeliveryContext,
    status: Status,
    *,
    result: ReplyResult | None = None,
    error: ErrorInfo | None = None,
    usage: Usage | None = None,
    tenant: TenantConfig | None = None,
    model: str | None = None,
    attempts: int | None = None,
    prompt_version: str | None = None,
    provider_ms: float = 0.0,
) -> InferenceReply:
    now = datetime.now(UTC)
    provider = tenant.provider if tenant else None
    return InferenceReply(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        task=request.task.value,
        status=status,
        result=result,
        usage=usage or Usage(),
        provenance=Provenance(
            provider_kind=provider.kind if provider else None,
            model=model or (_configured_model(tenant) if tenant else None),
            attempts=attempts if attempts is not None else ctx.attempts,
            policy=tenant.fallback.policy.value if tenant else None,
            prompt_version=prompt_version,
        ),
        timings=Timings(
            received_at=ctx.received_at,
            replied_at=now,
            provider_ms=round(provider_ms, 3),
            total_ms=round((time.monotonic() - ctx.received_monotonic) * 1000, 3),
        ),
        error=error,
    )


def _configured_model(tenant: TenantConfig) -> str | None:
    settings = tenant.provider
    for name in ("model", "deployment", "model_id"):
        value = getattr(settings, name, None)
        if isinstance(value, str):
            return value
    return None

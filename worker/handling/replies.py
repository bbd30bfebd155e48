"""The one reply builder: every `InferenceReply` the worker sends is made here, with its provenance and timings."""

import time
from datetime import UTC, datetime
from typing import Protocol

from contracts import (
    AttemptRecord,
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
from worker.handling.outcome import DeliveryContext, RequestIds
from worker.prompting.prompts import PreparedCall


class CallsMade(Protocol):
    """What the provider calls behind one reply did: usage, model, prompt, budget, trimming."""

    @property
    def model(self) -> str | None: ...

    @property
    def prompt_version(self) -> str | None: ...

    @property
    def model_calls(self) -> int: ...

    @property
    def repaired(self) -> bool: ...

    @property
    def provider_ms(self) -> float: ...

    @property
    def prepared(self) -> PreparedCall | None: ...

    def usage(self) -> Usage: ...


def ids_of(request: InferenceRequest) -> RequestIds:
    return RequestIds(request.request_id, request.tenant_id, request.task.value)


def reply(
    ids: RequestIds,
    ctx: DeliveryContext,
    status: Status,
    *,
    result: ReplyResult | None = None,
    error: ErrorInfo | None = None,
    usage: Usage | None = None,
    provenance: Provenance | None = None,
    provider_ms: float = 0.0,
) -> InferenceReply:
    """A reply to the delivery `ids` names; what was not said stays at the contract's defaults."""
    return InferenceReply(
        request_id=ids.request_id,
        tenant_id=ids.tenant_id,
        task=ids.task,
        status=status,
        result=result,
        usage=usage or Usage(),
        provenance=provenance or Provenance(),
        timings=Timings(
            received_at=ctx.received_at,
            replied_at=datetime.now(UTC),
            provider_ms=round(provider_ms, 3),
            total_ms=round((time.monotonic() - ctx.received_monotonic) * 1000, 3),
        ),
        error=error,
    )


def rejected(ids: RequestIds, ctx: DeliveryContext, error: ErrorInfo) -> InferenceReply:
    """A request the worker will not handle: only the ids it could read and why."""
    return reply(ids, ctx, Status.REJECTED, error=error)


def answer(
    request: InferenceRequest,
    ctx: DeliveryContext,
    status: Status,
    *,
    result: ReplyResult | None = None,
    error: ErrorInfo | None = None,
    tenant: TenantConfig | None = None,
    calls: CallsMade | None = None,
    attempts: int | None = None,
    fallback_used: bool | None = None,
    told: tuple[AttemptRecord, ...] | None = None,
) -> InferenceReply:
    """The reply to an inference request. `attempts` defaults to those made before this delivery, `told` (the
    history) to the one it arrived with, `fallback_used` to whether it came back from the ladder."""
    prepared = calls.prepared if calls else None
    provenance = Provenance(
        provider_kind=tenant.provider.kind if tenant else None,
        model=(calls.model if calls else None) or (configured_model(tenant) if tenant else None),
        attempts=attempts if attempts is not None else ctx.attempts,
        policy=tenant.fallback.policy.value if tenant else None,
        fallback_used=fallback_used if fallback_used is not None else ctx.attempts > 0,
        prompt_version=calls.prompt_version if calls else None,
        trimmed=prepared.trimmed if prepared else {},
        model_calls=calls.model_calls if calls else 0,
        repaired=calls.repaired if calls else False,
        context_window=prepared.budget.context_window if prepared else None,
        prompt_budget_tokens=prepared.budget.prompt_tokens if prepared else None,
        settle_seq=ctx.settle_seq,
        redeliveries=ctx.redeliveries,
        history=list(told if told is not None else ctx.history) if status is not Status.OK else [],
    )
    usage = calls.usage() if calls else Usage()
    provider_ms = calls.provider_ms if calls else 0.0
    return reply(
        ids_of(request),
        ctx,
        status,
        result=result,
        error=error,
        usage=usage,
        provenance=provenance,
        provider_ms=provider_ms,
    )


def configured_model(tenant: TenantConfig) -> str | None:
    settings = tenant.provider
    for name in ("model", "deployment", "model_id"):
        value = getattr(settings, name, None)
        if isinstance(value, str):
            return value
    return None

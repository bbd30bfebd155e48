"""Test Connection as a queue task: answer a `test_connection` request with a report, never a retry or fallback."""

import time

import structlog

from contracts import ConnectionReport, ErrorInfo, InferenceRequest, Provenance, ReplyResult, Status, Usage
from contracts.tenant import ProviderSettings
from worker.connection_check.guard import ConfigRefused
from worker.connection_check.probes import check_connection, check_draft_from_message, stored_timeout_s
from worker.handling import replies
from worker.handling.outcome import DeliveryContext, Outcome, Reply
from worker.handling.route import TenantLookup
from worker.providers.egress import EgressPolicy
from worker.providers.pool import ProviderPool
from worker.redaction import draft_secrets, remember_url_credentials
from worker.tenants import url_fields

log = structlog.get_logger("worker.connection_check")


async def answer_test_connection(
    request: InferenceRequest,
    ctx: DeliveryContext,
    tenants: TenantLookup,
    providers: ProviderPool,
    draft_egress: EgressPolicy,
) -> Outcome:
    """The queue's `test_connection` task: always a reply, never a retry, reroute or fallback."""
    started = time.monotonic()
    ids = replies.ids_of(request)
    tenant = tenants.get(request.tenant_id)
    if request.provider is None and tenant is None and tenants.problems(request.tenant_id) is not None:
        error = ErrorInfo(
            code="tenant_config_invalid",
            message="the tenant's stored configuration file does not validate (`atlas-worker tenants validate`)",
        )
        return Reply(replies.reply(ids, ctx, Status.FAILED, error=error))
    try:
        if request.provider is not None:
            report = await _check_draft(request.provider, draft_egress)
        elif tenant is not None:
            report = await check_connection(tenant.provider, providers.build, stored_timeout_s(tenant))
        else:
            raise ConfigRefused(
                "no_provider_config",
                "the tenant has no stored provider configuration; send one in the request's `provider` field",
            )
    except ConfigRefused as refused:
        return Reply(replies.rejected(ids, ctx, ErrorInfo(code=refused.code, message=refused.message)))
    usage = Usage(input_tokens=report.input_tokens, output_tokens=report.output_tokens)
    return Reply(
        replies.reply(
            ids,
            ctx,
            Status.OK,
            result=ReplyResult(connection=report),
            usage=usage,
            provenance=Provenance(provider_kind=report.provider_kind, model=report.model),
            provider_ms=(time.monotonic() - started) * 1000,
        )
    )


async def _check_draft(settings: ProviderSettings, draft_egress: EgressPolicy) -> ConnectionReport:
    """A draft from the message, its literal keys masked in whatever is written while it is checked (and only
    then: `draft_secrets`). An unexpected error is logged here, where its text is still masked, and passed on
    without that text."""
    with draft_secrets():
        for url in url_fields(settings):
            remember_url_credentials(url)
        try:
            return await check_draft_from_message(settings, draft_egress)
        except ConfigRefused:
            raise
        except Exception as exc:
            log.exception("test_connection_failed")
            raise DraftCheckFailed(f"checking the draft failed: {type(exc).__name__}") from None


class DraftCheckFailed(Exception):
    """A draft's check failed unexpectedly; its message never holds the error's own text (the draft's keys)."""

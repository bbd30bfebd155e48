"""Test Connection's probes: call a provider configuration and judge it against the model requirements.

The probes, cheapest first: a 16-token call (reachable, authenticated, model found, latency), a forced tool
call (tool calling: yes / forced only / no), a typical RCA call on a small sample incident (structured output
and RCA latency), and whatever the provider can say about its model (context window). Each failure names
what to fix. Secrets are resolved first: one that cannot be is its own failed check, and nothing is called.
`reachable` is claimed only when the provider answered. Reports never hold secrets (`worker.redaction`).
"""

import re
import time
from dataclasses import dataclass
from typing import Any

import structlog

from contracts import ConnectionReport, IncidentContext, InferenceRequest, RequirementCheck, Task, TenantConfig
from contracts.messages import ContextWindowSource, StructuredOutputSupport, ToolCallingSupport
from contracts.tenant import ProviderSettings
from worker.connection_check.guard import (
    Builder,
    refuse_secret_references,
    refuse_unsafe_endpoints,
    with_guarded_session,
)
from worker.connection_check.requirements import (
    context_check,
    fix_for,
    latency_check,
    structured_check,
    tools_check,
    verdict,
)
from worker.errors import ErrorClass, ProviderError
from worker.prompting.prompts import build_call
from worker.prompting.results import TaskFailure, interpret
from worker.providers.base import (
    Describable,
    Finish,
    ModelCall,
    ModelInfo,
    ModelResult,
    Provider,
    ToolSpec,
    Turn,
    structured_output_mode,
)
from worker.providers.bounded import within
from worker.providers.egress import EgressPolicy
from worker.providers.pool import endpoints
from worker.redaction import redact, redact_url
from worker.secrets import SecretUnresolved, resolve_secret
from worker.tenants import secret_fields

log = structlog.get_logger("worker.connection_check.probes")

DEFAULT_TIMEOUT_S = 30.0
STORED_TIMEOUT_CAP_S = 60.0  # a stored tenant is probed within its own timeout, but never longer than this
# Context windows of well-known models, for providers whose APIs do not report one.
MODEL_CONTEXT: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(pattern), tokens)
    for pattern, tokens in (
        (r"^gpt-4\.1", 1_047_576),
        (r"^gpt-4o", 128_000),
        (r"^gpt-4-(turbo|1106|0125)", 128_000),
        (r"^gpt-4-32k", 32_768),
        (r"^gpt-4(-0613)?$", 8_192),
        (r"^gpt-35-turbo|^gpt-3\.5-turbo", 16_385),
        (r"^gpt-5", 400_000),
        (r"^o[134](-mini)?\b", 200_000),
        (r"^gemini-1\.5-pro", 2_097_152),
        (r"^gemini-(1\.5|2\.0|2\.5)", 1_048_576),
    )
)
SAMPLE_INCIDENT = {
    "title": "Checkout API returns 503 for 20% of requests",
    "severity": "sev2",
    "service": "checkout-api",
    "started_at": "2026-01-15T10:02:00Z",
    "timeline": [
        {"at": "2026-01-15T09:58:00Z", "event": "checkout-api v2.14.0 deployed"},
        {"at": "2026-01-15T10:02:00Z", "event": "error rate alert fired"},
    ],
    "alerts": [
        {"name": "CheckoutHighErrorRate", "severity": "critical", "summary": "5xx ratio above 5% for 3 minutes"}
    ],
    "logs": [
        {"level": "error", "service": "checkout-api", "message": "timeout acquiring connection from pool (size=10)"},
        {"level": "error", "service": "checkout-api", "message": "upstream payments-db: too many connections"},
    ],
    "deploys": [
        {
            "service": "checkout-api",
            "version": "v2.14.0",
            "at": "2026-01-15T09:58:00Z",
            "description": "reduce DB pool size from 50 to 10",
        }
    ],
}
PROBE_TOOL = ToolSpec(
    "report_status",
    "Report whether the service under test is healthy.",
    {"type": "object", "properties": {"healthy": {"type": "boolean"}}, "required": ["healthy"]},
)


# --- the probes ---------------------------------------------------------------------------------------------


@dataclass
class _Probe:
    report: dict[str, Any]
    checks: list[RequirementCheck]
    input_tokens: int = 0
    output_tokens: int = 0

    def count(self, result: ModelResult) -> None:
        self.input_tokens += result.input_tokens
        self.output_tokens += result.output_tokens


def _ping(timeout_s: float) -> ModelCall:
    return ModelCall(
        system="This is a connection test. Reply with the single word OK.",
        turns=(Turn("user", "ping"),),
        max_output_tokens=16,
        timeout_s=timeout_s,  # no temperature: some models (o-series) refuse any but their default
    )


def _tool_probe(timeout_s: float, choice: str) -> ModelCall:
    return ModelCall(
        system="This is a connection test. Call the report_status tool.",
        turns=(Turn("user", "The service is healthy. Report its status with the tool."),),
        max_output_tokens=512,  # thinking models spend output tokens before they call anything
        timeout_s=timeout_s,
        tools=(PROBE_TOOL,),
        tool_choice=choice,
    )


def _sample_rca(settings: ProviderSettings, timeout_s: float) -> tuple[InferenceRequest, ModelCall]:
    request = InferenceRequest(
        request_id="connection-test",
        tenant_id="connection-test",
        task=Task.RCA,
        incident=IncidentContext.model_validate(SAMPLE_INCIDENT),
    )
    tenant = TenantConfig(tenant_id="connection-test", provider=settings, limits={"timeout_s": timeout_s})
    return request, build_call(request, tenant).call


async def _call(provider: Provider, call: ModelCall) -> tuple[ModelResult, float]:
    started = time.monotonic()
    try:
        result = await within(call.timeout_s, provider.endpoint, provider.complete(call))
    except ProviderError:
        raise
    except Exception as exc:
        # A configuration the provider's SDK chokes on (a malformed URL, say) is a finding, not a crash.
        log.warning("connection_probe_crashed", provider=provider.kind, error=type(exc).__name__)
        raise ProviderError(
            ErrorClass.BAD_REQUEST, f"{provider.kind} call failed: {type(exc).__name__}: {exc}", code="config_invalid"
        ) from None
    return result, (time.monotonic() - started) * 1000


# Failures that still prove the provider's endpoint answered: a status line, or a body we could not read.
ANSWERED_CODES = frozenset({"malformed_response"})
# Failures with a status that came from elsewhere (STS, a token endpoint), not from the provider's endpoint.
ANSWERED_ELSEWHERE = frozenset({"assume_role_failed"})


def connected(error: ProviderError) -> bool:
    """Did the provider's endpoint answer before this failure? Only then may a report say `reachable`."""
    if error.code in ANSWERED_ELSEWHERE:
        return False
    return error.status is not None or error.code in ANSWERED_CODES


def _failed_connection(probe: _Probe, kind: str, error: ProviderError) -> None:
    reachable = connected(error)
    probe.report["reachable"] = reachable
    if reachable and error.error_class is not ErrorClass.TRANSIENT:
        probe.report["authenticated"] = error.error_class is not ErrorClass.AUTH
        if error.error_class is ErrorClass.NOT_FOUND:
            probe.report["model_found"] = False
    probe.checks.append(
        RequirementCheck(requirement="connection", status="fail", message=error.message, fix=fix_for(kind, error))
    )


async def _tool_calling(provider: Provider, info: ModelInfo, timeout_s: float, probe: _Probe) -> ToolCallingSupport:
    if info.tools is False:
        return "no"
    try:
        result, _ = await _call(provider, _tool_probe(timeout_s, PROBE_TOOL.name))
    except ProviderError as exc:
        refused_tools = exc.code == "tools_unsupported" or "tool" in exc.message.lower()
        return "no" if exc.error_class is ErrorClass.BAD_REQUEST and refused_tools else "unknown"
    probe.count(result)
    if not result.tool_calls:
        return "unknown" if result.finish is Finish.LENGTH else "no"
    if provider.kind != "openai_compatible":
        return "yes"
    # vLLM answers named/required choices without --enable-auto-tool-choice, but rejects "auto".
    try:
        auto, _ = await _call(provider, _tool_probe(timeout_s, "auto"))
    except ProviderError as exc:
        return "forced_only" if exc.error_class is ErrorClass.BAD_REQUEST else "yes"
    probe.count(auto)
    return "yes"


async def _describe(provider: Provider, timeout_s: float) -> ModelInfo:
    if not isinstance(provider, Describable):
        return ModelInfo()
    try:
        return await within(timeout_s, provider.endpoint, provider.describe())
    except Exception:  # discovery is a bonus; the model calls already said what matters
        return ModelInfo()


def known_context_window(provider: Provider) -> int | None:
    """What the provider's own table of models says of this one's context window (Bedrock has one per family)."""
    known = getattr(provider, "known_context_window", None)
    return known if isinstance(known, int) else None


def _context_window(
    settings: ProviderSettings, provider: Provider, info: ModelInfo, served: str | None
) -> tuple[int | None, ContextWindowSource | None]:
    if settings.context_window is not None:
        return settings.context_window, "config"
    if info.context_window is not None:
        return info.context_window, "provider"
    if (known := known_context_window(provider)) is not None:
        return known, "model_table"
    for name in (served, provider.model):
        for pattern, tokens in MODEL_CONTEXT:
            if name and pattern.match(name.lower()):
                return tokens, "model_table"
    return None, None


async def probe_provider(provider: Provider, settings: ProviderSettings, timeout_s: float) -> ConnectionReport:
    """Run the probes against a built provider; never raises for provider failures (they are the report)."""
    probe = _Probe({"reachable": False}, [])
    kind = settings.kind
    try:
        ping, latency = await _call(provider, _ping(timeout_s))
    except ProviderError as exc:
        _failed_connection(probe, kind, exc)
        return _finish(provider, probe)
    probe.count(ping)
    probe.report |= {
        "reachable": True,
        "authenticated": True,
        "model_found": True,
        "latency_ms": round(latency, 1),
        "served_model": ping.model,
    }
    probe.checks.append(
        RequirementCheck(requirement="connection", status="pass", message=f"answered in {latency:.0f} ms")
    )
    info = await _describe(provider, timeout_s)
    tools = await _tool_calling(provider, info, timeout_s, probe)
    probe.report["tool_calling"] = tools
    probe.checks.append(tools_check(kind, tools))

    structured, rca_ms, detail = await _rca(provider, settings, timeout_s, probe)
    probe.report |= {"structured_output": structured, "rca_latency_ms": rca_ms}
    probe.checks.append(structured_check(kind, structured, detail))
    probe.checks.append(latency_check(rca_ms, detail))

    context, source = _context_window(settings, provider, info, ping.model)
    probe.report |= {"context_window": context, "context_window_source": source}
    probe.checks.append(context_check(kind, context, source))
    return _finish(provider, probe)


async def _rca(
    provider: Provider, settings: ProviderSettings, timeout_s: float, probe: _Probe
) -> tuple[StructuredOutputSupport, float | None, str | None]:
    request, call = _sample_rca(settings, timeout_s)
    try:
        result, elapsed = await _call(provider, call)
    except ProviderError as exc:
        unsupported = exc.error_class in (ErrorClass.BAD_REQUEST, ErrorClass.CONTEXT_OVERFLOW)
        return ("none" if unsupported else "unknown"), None, exc.message
    probe.count(result)
    try:
        interpret(request, result)
    except TaskFailure as failure:
        return "none", round(elapsed, 1), f"the sample RCA answer was unusable: {failure.message}"
    return structured_output_mode(provider), round(elapsed, 1), None


def _finish(provider: Provider, probe: _Probe) -> ConnectionReport:
    return ConnectionReport.model_validate(
        probe.report
        | {
            "provider_kind": provider.kind,
            "endpoint": provider.endpoint,
            "model": provider.model,
            "verdict": verdict(probe.checks),
            "checks": probe.checks,
            "input_tokens": probe.input_tokens,
            "output_tokens": probe.output_tokens,
        }
    )


def _unbuilt_report(settings: ProviderSettings, checks: list[RequirementCheck]) -> ConnectionReport:
    """A report for a configuration that was never called: nothing is claimed but what the checks say."""
    model = next((getattr(settings, n) for n in ("model", "deployment", "model_id") if hasattr(settings, n)), "")
    return ConnectionReport(
        provider_kind=settings.kind,
        endpoint=redact_url(endpoints(settings)[0]),
        model=str(model),
        reachable=False,
        verdict="not_ready",
        checks=checks,
    )


# --- secrets never leave ------------------------------------------------------------------------------------


def unresolved_secrets(settings: ProviderSettings) -> list[RequirementCheck]:
    """One failed `secrets` check per secret that does not resolve here; resolving the others makes them known
    to the redaction facility before any text about this configuration is written."""
    checks = []
    for name, secret in secret_fields(settings):
        try:
            resolve_secret(secret)
        except SecretUnresolved as exc:
            message = f"provider.{name} cannot be resolved ({exc.message})"
            checks.append(
                RequirementCheck(requirement="secrets", status="fail", message=message, fix=fix_for(settings.kind, exc))
            )
    return checks


def scrubbed(report: ConnectionReport) -> ConnectionReport:
    return ConnectionReport.model_validate(redact(report.model_dump(mode="json")))


# --- entry points -------------------------------------------------------------------------------------------


def stored_timeout_s(tenant: TenantConfig) -> float:
    """How long each probe of a stored tenant's configuration may take."""
    return min(tenant.limits.timeout_s, STORED_TIMEOUT_CAP_S)


async def check_connection(
    settings: ProviderSettings, build: Builder, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ConnectionReport:
    """Resolve the secrets, build the provider and probe it; the report is already scrubbed of secrets."""
    if unresolved := unresolved_secrets(settings):
        return scrubbed(_unbuilt_report(settings, unresolved))
    try:
        provider = build(settings)
    except ProviderError as exc:
        check = RequirementCheck(
            requirement="connection", status="fail", message=exc.message, fix=fix_for(settings.kind, exc)
        )
        return scrubbed(_unbuilt_report(settings, [check]))
    try:
        return scrubbed(await probe_provider(provider, settings, timeout_s))
    finally:
        await provider.aclose()


async def check_draft_from_message(
    settings: ProviderSettings, policy: EgressPolicy, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ConnectionReport:
    """A configuration from a message: literal secrets only, every connection under the draft egress policy."""
    refuse_secret_references(settings)
    await refuse_unsafe_endpoints(settings, policy)
    return await with_guarded_session(policy, lambda build: check_connection(settings, build, timeout_s))

"""Test Connection: probes a provider configuration and judges it against the product's model requirements.

The probes, cheapest first: a 16-token call (reachable, authenticated, model found, latency), a forced tool
call (tool calling: yes / forced only / no), a typical RCA call on a small sample incident (structured output
and RCA latency), and whatever the provider can say about its model (context window). Each failure names
what to fix. Reports never hold secrets: every secret value of the configuration is scrubbed from them.
"""

import asyncio
import ipaddress
import re
import socket
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pydantic import BaseModel, SecretStr

from contracts import (
    ConnectionReport,
    ErrorInfo,
    IncidentContext,
    InferenceReply,
    InferenceRequest,
    Provenance,
    ReplyResult,
    RequirementCheck,
    Status,
    Task,
    TenantConfig,
    Timings,
    Usage,
)
from contracts._base import TENANT_ID_PATTERN
from contracts.messages import ContextWindowSource, StructuredOutputSupport, ToolCallingSupport
from contracts.tenant import ProviderSettings
from worker.errors import ErrorClass, ProviderError
from worker.outcome import Outcome, Reply
from worker.prompts import build_call
from worker.providers import FACTORIES, ProviderPool
from worker.providers.base import (
    Describable,
    ModelCall,
    ModelInfo,
    ModelResult,
    Provider,
    ToolSpec,
    Turn,
    structured_output_mode,
)
from worker.providers.bedrock import UNKNOWN_FAMILY, BedrockProvider
from worker.secrets import is_reference, resolve_secret
from worker.tasks import TaskFailure, interpret
from worker.tenants import TenantConfigError, load_tenant_file, parse_tenant_config

if TYPE_CHECKING:
    from worker.handler import DeliveryContext, TenantLookup

DEFAULT_TIMEOUT_S = 30.0
CONTEXT_REQUIRED = 32_000
CONTEXT_RECOMMENDED = 128_000
RCA_LATENCY_TARGET_S = 30.0
# Cloud metadata services: reading them would hand out the worker's own cloud credentials.
METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task credentials
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud
}
METADATA_HOSTNAMES = {"metadata.google.internal", "metadata.goog", "metadata"}
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


class ConfigRefused(Exception):
    """A configuration carried in a message that the worker will not test (secret references, unsafe hosts)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- what a configuration sent over the queue may not do --------------------------------------------------


def _secret_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, SecretStr]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            yield f"{prefix}{name}", value


def refuse_secret_references(settings: ProviderSettings) -> None:
    """A message may carry literal secrets only: a reference would make the worker read its own secrets."""
    references = [name for name, value in _secret_fields(settings) if is_reference(value)]
    if references:
        raise ConfigRefused(
            "secret_reference_refused",
            f"provider.{', provider.'.join(references)}: env:/file: references are not accepted in a message; "
            "send the secret's value, or save the configuration and test the stored one",
        )


def endpoints_of(settings: ProviderSettings) -> list[str]:
    """Every URL the worker would contact for this configuration."""
    match settings.kind:
        case "openai_compatible" | "ollama":
            return [settings.base_url]
        case "azure_openai":
            return [settings.endpoint]
        case "bedrock":
            urls = [settings.endpoint_url or f"https://bedrock-runtime.{settings.region}.amazonaws.com"]
            if settings.role_arn:
                urls.append(settings.sts_endpoint_url or f"https://sts.{settings.region}.amazonaws.com")
            return urls
        case "vertex":
            host = f"{settings.location}-aiplatform.googleapis.com"
            urls = [settings.base_url or f"https://{host}"]
            try:
                key = orjson.loads(settings.service_account.get_secret_value())
            except orjson.JSONDecodeError:
                key = None
            if isinstance(key, dict) and isinstance(key.get("token_uri"), str):
                urls.append(key["token_uri"])  # google-auth posts the signed assertion here
            return urls
    raise AssertionError(settings)


def blocked_address(address: str) -> bool:
    """Link-local and metadata addresses are refused; loopback and private networks stay allowed."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip in METADATA_ADDRESSES or ip.is_link_local or ip.is_unspecified or ip.is_multicast


async def refuse_unsafe_endpoints(settings: ProviderSettings) -> None:
    """Resolve every endpoint now and refuse the configuration if any lands on a forbidden address."""
    loop = asyncio.get_running_loop()
    for url in endpoints_of(settings):
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ConfigRefused("endpoint_refused", f"{url!r} is not an http(s) URL")
        if host in METADATA_HOSTNAMES:
            raise ConfigRefused("endpoint_refused", f"{host} is a cloud metadata service; it cannot be tested")
        try:
            infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError:
            continue  # does not resolve: the probe will report it unreachable
        for info in infos:
            if blocked_address(str(info[4][0])):
                raise ConfigRefused(
                    "endpoint_refused",
                    f"{host} resolves to {info[4][0]}, a link-local or cloud-metadata address; it cannot be tested",
                )


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp does but drops forbidden addresses, so a DNS answer that changes after the check
    (DNS rebinding) still cannot reach a metadata service."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        allowed = [r for r in await self._inner.resolve(host, port, family) if not blocked_address(r["host"])]
        if not allowed:
            raise OSError(f"{host} resolves only to refused addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


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
        timeout_s=timeout_s,
        temperature=0.0,
    )


def _tool_probe(timeout_s: float, choice: str) -> ModelCall:
    return ModelCall(
        system="This is a connection test. Call the report_status tool.",
        turns=(Turn("user", "The service is healthy. Report its status with the tool."),),
        max_output_tokens=64,
        timeout_s=timeout_s,
        temperature=0.0,
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
        async with asyncio.timeout(call.timeout_s):
            result = await provider.complete(call)
    except TimeoutError:
        raise ProviderError(
            ErrorClass.TRANSIENT, f"{provider.kind} did not answer within {call.timeout_s:g}s", code="timeout"
        ) from None
    return result, (time.monotonic() - started) * 1000


def _fix_for(kind: str, error: ProviderError) -> str:
    """What the tenant admin should change, for a failed connection probe."""
    if error.code in ("unreachable",):
        return "check the endpoint URL, DNS, and that the worker's network (firewall, proxy) can reach it"
    if error.code == "timeout":
        return "check that the server is up and not overloaded; cold-starting models may need a longer timeout_s"
    if error.error_class is ErrorClass.AUTH:
        return {
            "azure_openai": "check api_key (Azure portal → Keys and Endpoint) and the resource's network rules",
            "bedrock": "check access_key_id / secret_access_key or role_arn (trust policy, external_id) and that the "
            "identity may call bedrock:InvokeModel",
            "vertex": "check service_account, that it has the Vertex AI User role, and that the Vertex AI API is "
            "enabled in the project",
            "openai_compatible": "check api_key (the server's --api-key)",
            "ollama": "Ollama itself needs no key; check any proxy in front of it",
        }.get(kind, "check the credentials")
    if error.error_class is ErrorClass.NOT_FOUND:
        return {
            "azure_openai": "check deployment (the deployment name, not the model name) and endpoint",
            "bedrock": "check model_id and region, and that model access is enabled in the Bedrock console",
            "vertex": "check model and location (not every model is offered in every location)",
            "openai_compatible": "check model: it must equal an id from GET /v1/models (vLLM --served-model-name)",
            "ollama": "pull the model on the Ollama server (`ollama pull <model>`)",
        }.get(kind, "check the model name")
    if error.error_class is ErrorClass.RATE_LIMITED:
        return "the provider is throttling this account; try again later or raise its rate limits"
    if error.error_class is ErrorClass.QUOTA:
        return "the account's quota or billing is exhausted at the provider; raise it"
    return "fix the configuration as the message says"


def _failed_connection(probe: _Probe, kind: str, error: ProviderError) -> None:
    unreachable = error.code in ("unreachable", "timeout", "config_invalid", "model_retired", "provider_unsupported")
    probe.report["reachable"] = not unreachable
    if not unreachable and error.error_class is not ErrorClass.TRANSIENT:
        probe.report["authenticated"] = error.error_class is not ErrorClass.AUTH
        if error.error_class is ErrorClass.NOT_FOUND:
            probe.report["model_found"] = False
    probe.checks.append(
        RequirementCheck(requirement="connection", status="fail", message=error.message, fix=_fix_for(kind, error))
    )


async def _tool_calling(provider: Provider, info: ModelInfo, timeout_s: float, probe: _Probe) -> ToolCallingSupport:
    if info.tools is False:
        return "no"
    try:
        result, _ = await _call(provider, _tool_probe(timeout_s, PROBE_TOOL.name))
    except ProviderError as exc:
        return "no" if exc.error_class is ErrorClass.BAD_REQUEST else "unknown"
    probe.count(result)
    if not result.tool_calls:
        return "no"
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
        return await provider.describe(timeout_s)
    except ProviderError:
        return ModelInfo()  # discovery is a bonus; the model calls already said what matters


def _context_window(
    settings: ProviderSettings, provider: Provider, info: ModelInfo, served: str | None
) -> tuple[int | None, ContextWindowSource | None]:
    if settings.context_window is not None:
        return settings.context_window, "config"
    if info.context_window is not None:
        return info.context_window, "provider"
    if isinstance(provider, BedrockProvider) and provider.family is not UNKNOWN_FAMILY:
        return provider.family.context_window, "model_table"
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
    probe.checks.append(_tools_check(kind, tools))

    structured, rca_ms, detail = await _rca(provider, settings, timeout_s, probe)
    probe.report |= {"structured_output": structured, "rca_latency_ms": rca_ms}
    probe.checks.append(_structured_check(kind, structured, detail))
    probe.checks.append(_latency_check(rca_ms, detail))

    context, source = _context_window(settings, provider, info, ping.model)
    probe.report |= {"context_window": context, "context_window_source": source}
    probe.checks.append(_context_check(kind, context, source))
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


def _tools_check(kind: str, tools: ToolCallingSupport) -> RequirementCheck:
    if tools == "yes":
        return RequirementCheck(requirement="tool_calling", status="pass", message="the model calls tools")
    if tools == "forced_only":
        return RequirementCheck(
            requirement="tool_calling",
            status="pass",
            message="the model calls tools when they are forced (runbooks force them); automatic choice is off",
            fix="for automatic tool choice start vLLM with --enable-auto-tool-choice --tool-call-parser <parser>",
        )
    if tools == "no":
        return RequirementCheck(
            requirement="tool_calling",
            status="fail",
            message="the model does not call tools; runbook generation requires tool calling",
            fix={
                "bedrock": "use a model family with tool use: Claude 3+, Nova, Llama 3.1+, Mistral Large, Command R",
                "ollama": "use a model whose `ollama show` capabilities include tools (e.g. llama3.1, qwen2.5)",
                "openai_compatible": "serve a model with a tool-capable chat template (vLLM: --tool-call-parser)",
            }.get(kind, "use a model with tool calling"),
        )
    return RequirementCheck(
        requirement="tool_calling",
        status="warn",
        message="tool calling could not be checked (the probe failed for another reason)",
        fix="run Test Connection again",
    )


def _structured_check(kind: str, structured: StructuredOutputSupport, detail: str | None) -> RequirementCheck:
    if structured == "schema":
        return RequirementCheck(
            requirement="structured_output", status="pass", message="the provider enforces the RCA JSON schema"
        )
    fix = {
        "azure_openai": "use api_version 2024-08-01-preview or newer for JSON-schema output",
        "bedrock": "use a model family with tool use, so the answer can be a forced tool call",
    }.get(kind, "use a model or server version that supports JSON-schema output")
    if structured == "json_mode":
        message = "JSON mode only: answers are JSON but the schema is not enforced (recommended for RCA)"
    elif structured == "none":
        message = detail or "no structured output: RCA answers are validated after the fact and may fail"
    else:
        message, fix = f"structured output could not be checked: {detail}", "run Test Connection again"
    return RequirementCheck(requirement="structured_output", status="warn", message=message, fix=fix)


def _latency_check(rca_ms: float | None, detail: str | None) -> RequirementCheck:
    if rca_ms is None:
        return RequirementCheck(
            requirement="rca_latency",
            status="warn",
            message=f"the sample RCA call failed, so its latency is unknown ({detail})",
            fix="fix the structured-output problem above, then test again",
        )
    if rca_ms <= RCA_LATENCY_TARGET_S * 1000:
        return RequirementCheck(
            requirement="rca_latency", status="pass", message=f"a sample RCA took {rca_ms / 1000:.1f} s"
        )
    return RequirementCheck(
        requirement="rca_latency",
        status="warn",
        message=f"a sample RCA took {rca_ms / 1000:.1f} s; a typical RCA should take under {RCA_LATENCY_TARGET_S:g} s",
        fix="use a faster model or deployment, or add capacity (provisioned throughput, more GPUs)",
    )


def _context_check(kind: str, context: int | None, source: str | None) -> RequirementCheck:
    set_it = "set provider.context_window in the tenant file to the model's window"
    if context is None:
        return RequirementCheck(
            requirement="context_window",
            status="warn",
            message=f"context window unknown (needs ≥ {CONTEXT_REQUIRED:,}, {CONTEXT_RECOMMENDED:,} recommended)",
            fix=set_it,
        )
    if context < CONTEXT_REQUIRED:
        return RequirementCheck(
            requirement="context_window",
            status="fail",
            message=f"context window {context:,} tokens ({source}) is below the required {CONTEXT_REQUIRED:,}",
            fix="use a model with a larger context window" + (" or raise num_ctx" if kind == "ollama" else ""),
        )
    if kind == "ollama" and source != "config":
        # Ollama's effective window is num_ctx, often far below what the model was trained for.
        return RequirementCheck(
            requirement="context_window",
            status="warn",
            message=f"the model supports {context:,} tokens, but Ollama only uses its num_ctx unless asked",
            fix=set_it + " so the worker requests it as num_ctx",
        )
    if context < CONTEXT_RECOMMENDED:
        return RequirementCheck(
            requirement="context_window",
            status="warn",
            message=f"context window {context:,} tokens ({source}); {CONTEXT_RECOMMENDED:,} is recommended",
            fix="large incidents will be trimmed; a model with a 128K window avoids that",
        )
    return RequirementCheck(requirement="context_window", status="pass", message=f"{context:,} tokens ({source})")


def _finish(provider: Provider, probe: _Probe) -> ConnectionReport:
    statuses = {c.status for c in probe.checks}
    verdict = "not_ready" if "fail" in statuses else "ready_with_warnings" if "warn" in statuses else "ready"
    return ConnectionReport.model_validate(
        probe.report
        | {
            "provider_kind": provider.kind,
            "endpoint": provider.endpoint,
            "model": provider.model,
            "verdict": verdict,
            "checks": probe.checks,
            "input_tokens": probe.input_tokens,
            "output_tokens": probe.output_tokens,
        }
    )


def _unbuilt_report(settings: ProviderSettings, error: ProviderError) -> ConnectionReport:
    model = next((getattr(settings, n) for n in ("model", "deployment", "model_id") if hasattr(settings, n)), "")
    endpoint = endpoints_of(settings)[0]
    check = RequirementCheck(
        requirement="connection", status="fail", message=error.message, fix=_fix_for(settings.kind, error)
    )
    return ConnectionReport(
        provider_kind=settings.kind,
        endpoint=endpoint,
        model=str(model),
        reachable=False,
        verdict="not_ready",
        checks=[check],
    )


# --- secrets never leave ------------------------------------------------------------------------------------


def secret_values(settings: ProviderSettings) -> list[str]:
    """Every secret value the configuration holds or points at, and the parts of a JSON key."""
    values: list[str] = []
    for _, secret in _secret_fields(settings):
        try:
            value = resolve_secret(secret)
        except ProviderError:
            continue
        values.append(value)
        try:
            key = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(key, dict):
            values += [str(key[k]) for k in ("private_key", "private_key_id") if key.get(k)]
    return [v for v in values if len(v) >= 4]


def redact(report: ConnectionReport, secrets: list[str]) -> ConnectionReport:
    text = report.model_dump_json()
    for secret in sorted(secrets, key=len, reverse=True):
        for form in (secret, orjson.dumps(secret).decode()[1:-1]):
            text = text.replace(form, "[secret]")
    return ConnectionReport.model_validate_json(text)


# --- entry points -------------------------------------------------------------------------------------------


Builder = Callable[[ProviderSettings], Provider]


async def check_connection(
    settings: ProviderSettings, build: Builder, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ConnectionReport:
    """Build the provider and probe it; the report is already scrubbed of secrets."""
    try:
        provider = build(settings)
    except ProviderError as exc:
        report = _unbuilt_report(settings, exc)
    else:
        report = await probe_provider(provider, settings, timeout_s)
    return redact(report, secret_values(settings))


async def with_guarded_session(run: Callable[[Builder], Awaitable[ConnectionReport]]) -> ConnectionReport:
    """Runs `run` with providers whose HTTP never reaches a refused address (for configs from messages)."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver())
    async with aiohttp.ClientSession(connector=connector) as session:

        def build(settings: ProviderSettings) -> Provider:
            if settings.kind == "bedrock":
                return BedrockProvider(settings, resolver=GuardedResolver())
            factory = FACTORIES.get(settings.kind)
            if factory is None:
                raise ProviderError(
                    ErrorClass.BAD_REQUEST,
                    f"provider kind {settings.kind!r} is not available",
                    code="provider_unsupported",
                )
            return factory(settings, session)

        return await run(build)


async def check_draft_from_message(
    settings: ProviderSettings, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ConnectionReport:
    """A configuration from a message: literal secrets only, no link-local or metadata endpoints."""
    refuse_secret_references(settings)
    await refuse_unsafe_endpoints(settings)
    return await with_guarded_session(lambda build: check_connection(settings, build, timeout_s))


async def answer_test_connection(
    request: InferenceRequest,
    ctx: "DeliveryContext",
    tenants: "TenantLookup",
    providers: ProviderPool,
) -> Outcome:
    """The queue's `test_connection` task: always a reply, never a retry, reroute or fallback."""
    started = time.monotonic()
    tenant = tenants.get(request.tenant_id)
    if request.provider is None and tenant is None and tenants.problems(request.tenant_id) is not None:
        error = ErrorInfo(
            code="tenant_config_invalid",
            message="the tenant's stored configuration file does not validate (`atlas-worker tenants validate`)",
        )
        return Reply(_reply(request, ctx, Status.FAILED, error=error))
    try:
        if request.provider is not None:
            report = await check_draft_from_message(request.provider)
        elif tenant is not None:
            report = await check_connection(tenant.provider, providers.build, min(tenant.limits.timeout_s, 60.0))
        else:
            raise ConfigRefused(
                "no_provider_config",
                "the tenant has no stored provider configuration; send one in the request's `provider` field",
            )
    except ConfigRefused as refused:
        return Reply(_reply(request, ctx, Status.REJECTED, error=ErrorInfo(code=refused.code, message=refused.message)))
    usage = Usage(input_tokens=report.input_tokens, output_tokens=report.output_tokens)
    return Reply(
        _reply(
            request,
            ctx,
            Status.OK,
            result=ReplyResult(connection=report),
            usage=usage,
            provenance=Provenance(provider_kind=report.provider_kind, model=report.model),
            provider_ms=(time.monotonic() - started) * 1000,
        )
    )


def _reply(
    request: InferenceRequest,
    ctx: "DeliveryContext",
    status: Status,
    *,
    result: ReplyResult | None = None,
    error: ErrorInfo | None = None,
    usage: Usage | None = None,
    provenance: Provenance | None = None,
    provider_ms: float = 0.0,
) -> InferenceReply:
    return InferenceReply(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        task=request.task.value,
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


# --- human-readable output ----------------------------------------------------------------------------------


def render(report: ConnectionReport) -> str:
    """The report as an operator reads it in a terminal."""

    def yes(value: bool | None) -> str:
        return "unknown" if value is None else "yes" if value else "NO"

    lines = [
        f"Test Connection: {report.provider_kind} {report.model} at {report.endpoint}",
        f"  reachable          {yes(report.reachable)}"
        + (f" ({report.latency_ms:.0f} ms)" if report.latency_ms is not None else ""),
        f"  authenticated      {yes(report.authenticated)}",
        f"  model found        {yes(report.model_found)}"
        + (f" (serves {report.served_model})" if report.served_model else ""),
        f"  tool calling       {report.tool_calling.replace('_', ' ')}",
        f"  structured output  {report.structured_output.replace('_', ' ')}",
        "  context window     "
        + (
            f"{report.context_window:,} tokens ({report.context_window_source})" if report.context_window else "unknown"
        ),
        "  sample RCA         "
        + (f"{report.rca_latency_ms / 1000:.1f} s" if report.rca_latency_ms is not None else "-"),
        f"  tokens used        {report.input_tokens} in, {report.output_tokens} out",
        "",
        f"Verdict: {report.verdict.replace('_', ' ').upper()}",
    ]
    for check in report.checks:
        lines.append(f"  {check.status:<4}  {check.requirement:<17} {check.message}")
        if check.fix and check.status != "pass":
            lines.append(f"        {'':<17} fix: {check.fix}")
    return "\n".join(lines)


# --- the command line ---------------------------------------------------------------------------------------


class DraftError(Exception):
    """A tenant file given on the command line does not validate."""


def load_draft(path: Path) -> TenantConfig:
    """A tenant file not yet saved: a whole tenant file, or just its `[provider]` table."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DraftError(f"{path}: {exc}") from None
    data.setdefault("tenant_id", "draft")
    try:
        # The operator's own file on the worker's host: env:/file: references are fine here.
        return parse_tenant_config(data, path, secrets_as_references=False)
    except TenantConfigError as exc:
        raise DraftError("\n".join(map(str, exc.problems))) from None


def load_stored(tenants_dir: Path, tenant_id: str) -> TenantConfig:
    if not re.fullmatch(TENANT_ID_PATTERN, tenant_id):
        raise DraftError(f"{tenant_id!r} is not a tenant id")
    path = tenants_dir / f"{tenant_id}.toml"
    if not path.exists():
        raise DraftError(f"{path} does not exist")
    try:
        return load_tenant_file(path)
    except TenantConfigError as exc:
        raise DraftError("\n".join(map(str, exc.problems))) from None


async def check_tenant(tenant: TenantConfig, timeout_s: float | None) -> ConnectionReport:
    """Test Connection as the operator runs it: the worker's own network and secrets, no extra guards."""
    async with aiohttp.ClientSession() as session:
        pool = ProviderPool(session)
        return await check_connection(tenant.provider, pool.build, timeout_s or min(tenant.limits.timeout_s, 60.0))

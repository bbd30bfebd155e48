"""The product's model requirements, judged from what Test Connection observed, and the report as text."""

from contracts import ConnectionReport, RequirementCheck
from contracts.messages import StructuredOutputSupport, ToolCallingSupport, Verdict
from worker.errors import ErrorClass, ProviderError
from worker.secrets import SecretUnresolved

CONTEXT_REQUIRED = 32_000
CONTEXT_RECOMMENDED = 128_000
RCA_LATENCY_TARGET_S = 30.0
SOURCES = {"config": "from the tenant config", "provider": "reported by the provider", "model_table": "known model"}


# What to change for a failed probe, by error code first (the most specific cause), then by error class.
# A hint is one string, or one per provider kind with "" as the fallback; `tests/unit/test_fix_hints.py` holds
# one case per entry.
Hint = str | dict[str, str]
FIX_BY_CODE: dict[str, Hint] = {
    "unreachable": "check the endpoint URL, DNS, and that the worker's network (firewall, proxy) can reach it",
    "timeout": "check that the server is up and not overloaded; cold-starting models may need a longer timeout_s",
    "secret_unresolved": {
        "bedrock": "set access_key_id and secret_access_key, or role_arn, in the provider settings",
        "": "set the provider's secret references (env: or file:) so they resolve where the worker runs",
    },
    "service_account_invalid": "service_account must hold a whole service-account JSON key "
    "(IAM → Service accounts → Keys → Add key → JSON)",
    "assume_role_failed": "check role_arn, that the role's trust policy trusts the calling identity, and external_id",
    "config_invalid": "fix the provider settings as the message says",
    "model_retired": "use a current model, as the message says",
    "provider_unsupported": "check provider.kind: this worker does not include that provider",
    "forbidden": {
        "azure_openai": "the key is valid but refused: check the resource's network rules (firewall, private "
        "endpoint) allow the worker",
        "bedrock": "allow bedrock:InvokeModel on this model for the identity, and enable the model under "
        "Bedrock model access",
        "vertex": "grant the service account the Vertex AI User role and enable the Vertex AI API in the project",
        "": "the credentials are valid but lack permission, or a proxy or network rule blocks the worker",
    },
    "inference_profile_required": "use the model's inference profile id as model_id (e.g. eu.<model id>)",
    "malformed_response": "the endpoint answered in another format: check provider.kind and the URL "
    "(an OpenAI-compatible base_url usually ends in /v1)",
    "provider_unavailable": "the provider is failing on its side; try again later or check the server's logs",
    "content_filtered": "the provider's content filter blocked the probe; review its content filter settings",
}
FIX_BY_CLASS: dict[ErrorClass, Hint] = {
    ErrorClass.AUTH: {
        "azure_openai": "check api_key (Azure portal → Keys and Endpoint)",
        "bedrock": "check access_key_id / secret_access_key or role_arn (trust policy, external_id)",
        "vertex": "check service_account: the key may be deleted or disabled",
        "openai_compatible": "check api_key (the server's --api-key)",
        "ollama": "Ollama itself needs no key; check any proxy in front of it",
        "": "check the credentials",
    },
    ErrorClass.NOT_FOUND: {
        "azure_openai": "check deployment (the deployment name, not the model name) and endpoint",
        "bedrock": "check model_id and region, and that model access is enabled in the Bedrock console",
        "vertex": "check model and location (not every model is offered in every location)",
        "openai_compatible": "check model: it must equal an id from GET /v1/models (vLLM --served-model-name)",
        "ollama": "pull the model on the Ollama server (`ollama pull <model>`)",
        "": "check the model name",
    },
    ErrorClass.RATE_LIMITED: "the provider is throttling this account; try again later or raise its rate limits",
    ErrorClass.QUOTA: "the account's quota or billing is exhausted at the provider; raise it",
    ErrorClass.CONTEXT_OVERFLOW: "even the probe does not fit the model's context window; use a larger model",
    ErrorClass.TRANSIENT: "the provider failed for now; test again, and check the server if it persists",
    ErrorClass.BAD_REQUEST: "the provider rejected the probe: check model and api_version against the message",
}


def fix_for(kind: str, error: ProviderError) -> str:
    """What the tenant admin should change, for a failed check: the hint for this error's own cause."""
    if isinstance(error, SecretUnresolved):
        return (
            f"make {error.reference} available to the process running the test: test-connection resolves env: and "
            "file: secrets from its own environment (on the command line: that shell's variables and files; on "
            "the queue: the worker's)"
        )
    hint = FIX_BY_CODE.get(error.code) or FIX_BY_CLASS.get(error.error_class) or "fix the configuration"
    return hint if isinstance(hint, str) else hint.get(kind, hint[""])


def tools_check(kind: str, tools: ToolCallingSupport) -> RequirementCheck:
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


def structured_check(kind: str, structured: StructuredOutputSupport, detail: str | None) -> RequirementCheck:
    if structured == "schema":
        return RequirementCheck(
            requirement="structured_output", status="pass", message="the provider enforces the RCA JSON schema"
        )
    fix = {
        "azure_openai": "use api_version 2024-08-01-preview or newer for JSON-schema output",
        "bedrock": "use a model family with tool use, so the answer can be a forced tool call",
    }.get(kind, "use a model or server version that supports JSON-schema output")
    if structured == "json_mode":
        message = (
            "JSON mode only: answers are JSON but the schema is not enforced (schema output is recommended for RCA)"
        )
    elif structured == "none":
        message = detail or "no structured output: RCA answers are validated after the fact and may fail"
    else:
        message, fix = f"structured output could not be checked: {detail}", "run Test Connection again"
    return RequirementCheck(requirement="structured_output", status="warn", message=message, fix=fix)


def latency_check(rca_ms: float | None, detail: str | None) -> RequirementCheck:
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


def context_check(kind: str, context: int | None, source: str | None) -> RequirementCheck:
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
            message=f"context window {context:,} tokens ({SOURCES.get(source or '', source)}) is below the required "
            f"{CONTEXT_REQUIRED:,}",
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
            message=f"context window {context:,} tokens ({SOURCES.get(source or '', source)}); "
            f"{CONTEXT_RECOMMENDED:,} is recommended",
            fix="large incidents will be trimmed; a model with a 128K window avoids that",
        )
    return RequirementCheck(
        requirement="context_window", status="pass", message=f"{context:,} tokens ({SOURCES.get(source or '', source)})"
    )


def verdict(checks: list[RequirementCheck]) -> Verdict:
    statuses = {c.status for c in checks}
    return "not_ready" if "fail" in statuses else "ready_with_warnings" if "warn" in statuses else "ready"


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
            f"{report.context_window:,} tokens ({SOURCES.get(report.context_window_source or '')})"
            if report.context_window
            else "unknown"
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

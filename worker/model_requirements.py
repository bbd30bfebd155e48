"""The product's model requirements, judged from what Test Connection observed, and the report as text."""

from contracts import ConnectionReport, RequirementCheck
from contracts.messages import StructuredOutputSupport, ToolCallingSupport, Verdict
from worker.errors import ErrorClass, ProviderError

CONTEXT_REQUIRED = 32_000
CONTEXT_RECOMMENDED = 128_000
RCA_LATENCY_TARGET_S = 30.0
SOURCES = {"config": "from the tenant config", "provider": "reported by the provider", "model_table": "known model"}


def fix_for(kind: str, error: ProviderError) -> str:
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

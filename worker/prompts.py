"""Builds the model call for a request from versioned templates, deterministically."""

from dataclasses import dataclass
from typing import Any

import orjson

from contracts import IncidentContext, InferenceRequest, RcaResult, Task, TenantConfig
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from worker.providers.base import ModelCall, OutputSchema, ToolSpec, Turn

PROMPT_VERSIONS: dict[Task, str] = {
    Task.RCA: "rca/1",
    Task.RUNBOOK: "runbook/1",
    Task.SUMMARY: "summary/1",
    Task.CHAT: "chat/1",
}
DEFAULT_MAX_OUTPUT_TOKENS: dict[Task, int] = {
    Task.RCA: 2048,
    Task.RUNBOOK: 1536,
    Task.SUMMARY: 512,
    Task.CHAT: 1024,
}

SYSTEM_PROMPTS: dict[Task, str] = {
    Task.RCA: (
        "You are a senior site reliability engineer performing root-cause analysis. "
        "Use only the incident context given. Cite evidence by its kind and index as shown in "
        "brackets, e.g. [log 3]. Give each probable cause a confidence between 0 and 1. "
        "Answer with JSON matching the requested schema and nothing else."
    ),
    Task.RUNBOOK: (
        "You are a senior site reliability engineer writing a runbook for this incident. "
        "Express every step as a call to one of the provided tools, in the order they should run. "
        "Prefer read-only diagnostics before changes."
    ),
    Task.SUMMARY: (
        "You are a senior site reliability engineer. Summarise the incident for a status update in "
        "at most five sentences: what is affected, since when, the most likely cause, and what is being done."
    ),
    Task.CHAT: "You are an assistant helping engineers respond to an incident.",
}


@dataclass(frozen=True)
class PreparedCall:
    call: ModelCall
    prompt_version: str


def render_incident(incident: IncidentContext) -> str:
    """The incident as plain text, every item tagged `[kind index]` so answers can cite it."""
    lines = [f"Incident: {incident.title}", f"Severity: {incident.severity}"]
    if incident.service:
        lines.append(f"Service: {incident.service}")
    if incident.started_at:
        lines.append(f"Started: {incident.started_at.isoformat()}")
    if incident.summary:
        lines.append(f"Summary: {incident.summary}")
    if incident.timeline:
        lines.append("\nTimeline:")
        lines += [f"[timeline {i}] {e.at.isoformat()} {e.event}" for i, e in enumerate(incident.timeline)]
    if incident.alerts:
        lines.append("\nAlerts:")
        for i, a in enumerate(incident.alerts):
            labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
            lines.append(f"[alert {i}] {a.name} severity={a.severity or '-'} {labels} {a.summary or ''}".rstrip())
    if incident.deploys:
        lines.append("\nRecent deploys:")
        lines += [
            f"[deploy {i}] {d.at.isoformat()} {d.service} {d.version} {d.description or ''}".rstrip()
            for i, d in enumerate(incident.deploys)
        ]
    if incident.metrics:
        lines.append("\nMetrics:")
        for i, m in enumerate(incident.metrics):
            points = " ".join(f"{p.at.strftime('%H:%M:%S')}={p.value:g}" for p in m.points)
            lines.append(f"[metric {i}] {m.name} ({m.unit or '-'}): {points}")
    if incident.logs:
        lines.append("\nLogs:")
        for i, line in enumerate(incident.logs):
            at = line.at.isoformat() if line.at else "-"
            lines.append(f"[log {i}] {at} {line.level or '-'} {line.service or '-'} {line.message}")
    return "\n".join(lines)


def rca_schema() -> dict[str, Any]:
    return RcaResult.model_json_schema()


def build_call(request: InferenceRequest, tenant: TenantConfig) -> PreparedCall:
    task = request.task

    def call(system: str, turns: tuple[Turn, ...], **extra: Any) -> PreparedCall:
        model_call = ModelCall(
            system=system,
            turns=turns,
            max_output_tokens=request.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS[task],
            timeout_s=tenant.limits.timeout_s,
            temperature=request.temperature,
            **extra,
        )
        return PreparedCall(model_call, PROMPT_VERSIONS[task])

    if task is Task.CHAT:
        messages = request.messages or []
        system = "\n".join(m.content for m in messages if m.role == "system") or SYSTEM_PROMPTS[task]
        turns = tuple(
            Turn(role=m.role, content=m.content, tool_call_id=m.tool_call_id) for m in messages if m.role != "system"
        )
        return call(system, turns)
    assert request.incident is not None  # guaranteed by InferenceRequest's validator
    context = (Turn("user", render_incident(request.incident)),)
    if task is Task.RCA:
        return call(SYSTEM_PROMPTS[task], context, output_schema=OutputSchema("rca_result", rca_schema()))
    if task is Task.RUNBOOK:
        declarations = request.tools or DEFAULT_RUNBOOK_TOOLS
        tools = tuple(ToolSpec(t.name, t.description, t.parameters) for t in declarations)
        return call(SYSTEM_PROMPTS[task], context, tools=tools, tool_choice="required")
    return call(SYSTEM_PROMPTS[task], context)


def canonical(call: ModelCall) -> bytes:
    """A stable serialisation of a call, to show that the same request builds the same prompt."""
    return orjson.dumps(call, option=orjson.OPT_SORT_KEYS)

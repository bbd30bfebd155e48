"""Builds the model call for a request from versioned templates, deterministically, within the context budget.

The same request and tenant always build the byte-identical call (`canonical`): no clocks, no randomness, no
unordered iteration. Any change to a template, or to the incident text in `prompting.evidence`, bumps its version,
which every reply reports in `provenance.prompt_version`.
"""

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
from pydantic import BaseModel

from contracts import InferenceRequest, RcaResult, Task, TenantConfig, ToolDeclaration
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from worker.prompting import budget as budgets
from worker.prompting import tool_schemas
from worker.prompting.budget import Budget
from worker.prompting.evidence import IncidentView
from worker.prompting.results import TaskFailure, TaskFailureCode
from worker.prompting.strict_schema import strict_json_schema
from worker.prompting.tool_schemas import ToolSchemaError
from worker.providers.base import ModelCall, OutputSchema, ToolSpec, Turn

PROMPT_VERSIONS: dict[Task, str] = {
    Task.RCA: "rca/1",
    Task.RUNBOOK: "runbook/1",
    Task.SUMMARY: "summary/1",
    Task.CHAT: "chat/1",
}
REPAIR_VERSION = "repair/1"
DEFAULT_MAX_OUTPUT_TOKENS: dict[Task, int] = {
    Task.RCA: 2048,
    Task.RUNBOOK: 1536,
    Task.SUMMARY: 512,
    Task.CHAT: 1024,
}
RCA_SCHEMA_NAME = "rca_result"

_CITING = (
    "Every item of the context is tagged with its kind and position, e.g. [log 12] or [deploy 0]. "
    "Work only from this context and do not invent facts."
)
SYSTEM_PROMPTS: dict[Task, str] = {
    Task.RCA: (
        "You are a senior site reliability engineer performing a root-cause analysis of a production incident. "
        f"{_CITING} Cite the evidence of each probable cause by the kind and index of its tag; cite only items "
        "that are shown. Give each probable cause a confidence between 0 and 1 and list the most likely first. "
        "List remediation steps in the order to take them, each with its risk. "
        "Answer with one JSON object that matches this JSON Schema, and nothing else:\n"
    ),
    Task.RUNBOOK: (
        "You are a senior site reliability engineer writing the runbook for a production incident. "
        f"{_CITING} Express every step as a call to one of the provided tools, in the order the steps should "
        "run: read-only diagnostics first, then the least risky change that can mitigate, then escalation. "
        "Use only services named in the context. Do not answer in prose."
    ),
    Task.SUMMARY: (
        "You are a senior site reliability engineer writing a status update about a production incident. "
        f"{_CITING} In at most five sentences of plain text, say what is affected, since when, the most likely "
        "cause and what is being done."
    ),
    Task.CHAT: "You are an assistant helping engineers respond to a production incident.",
}
INSTRUCTIONS: dict[Task, str] = {
    Task.RCA: "Analyse the root cause of this incident.",
    Task.RUNBOOK: "Write the runbook for this incident as tool calls.",
    Task.SUMMARY: "Summarise this incident.",
}
REPAIR_INVALID = (
    "That answer cannot be used: {error}. Reply again with the corrected JSON object only. It must match the "
    "schema, and its evidence may cite only items shown in the incident context."
)
REPAIR_TRUNCATED = (
    "Your answer was cut off at the output limit before the JSON object was complete. Reply again with a "
    "shorter, complete JSON object: at most 3 probable causes, at most 5 remediation steps, at most 3 "
    "follow-ups, and one or two sentences in each text field."
)


@dataclass(frozen=True, slots=True)
class PreparedCall:
    call: ModelCall
    prompt_version: str
    budget: Budget
    view: IncidentView | None = None  # what the model is shown of the incident (None for chat)

    @property
    def trimmed(self) -> dict[str, int]:
        return dict(self.view.trimmed) if self.view is not None else {}

    @property
    def citable(self) -> dict[str, frozenset[int]] | None:
        return self.view.citable() if self.view is not None else None


@functools.cache
def rca_output_schema() -> OutputSchema:
    """Built once per process (deriving it takes milliseconds); every call shares it and only reads it."""
    return OutputSchema(RCA_SCHEMA_NAME, strict_json_schema(RcaResult))


@dataclass(frozen=True, slots=True)
class _Template:
    """The parts of an incident task's call that do not depend on the incident."""

    system: str
    extra: Mapping[str, Any]  # ModelCall fields beyond the turns: the output schema, or the tools
    fixed_tokens: int  # the estimate of everything sent except the incident text


def _template(task: Task, declarations: tuple[ToolDeclaration, ...]) -> _Template:
    extra: dict[str, Any] = {}
    system = SYSTEM_PROMPTS[task]
    if task is Task.RCA:
        extra["output_schema"] = rca_output_schema()
        system += _json(extra["output_schema"].schema)
    elif task is Task.RUNBOOK:
        extra["tools"] = tuple(ToolSpec(t.name, t.description, t.parameters) for t in declarations)
        extra["tool_choice"] = "required"
    return _Template(system, extra, _prompt_tokens(system, INSTRUCTIONS[task], extra))


@functools.cache
def _constant_template(task: Task) -> _Template:
    """A task's template when the request brings no tools of its own never changes: built once per process."""
    return _template(task, DEFAULT_RUNBOOK_TOOLS)


def runbook_tools(request: InferenceRequest) -> tuple[ToolDeclaration, ...]:
    """The request's tool declarations, or the platform defaults; rejects declarations that break a tool-schema
    rule (`prompting.tool_schemas`). CPU-bound for a publisher's schemas: the handler calls it off the event loop."""
    if not request.tools:
        return DEFAULT_RUNBOOK_TOOLS
    declarations = tuple(request.tools)
    names = [d.name for d in declarations]
    if len(set(names)) != len(names):
        raise TaskFailure(TaskFailureCode.INVALID_TOOLS, "tool names must be unique", rejected=True)
    checking = declarations[0].name
    try:
        with tool_schemas.budget():  # one budget for all of the request's tools
            for declaration in declarations:
                checking = declaration.name
                tool_schemas.check_parameters(declaration.parameters)
    except ToolSchemaError as exc:
        message = f"parameters of tool {checking!r} break rule {exc.rule}: {exc.message}"
        raise TaskFailure(TaskFailureCode.INVALID_TOOLS, message, rejected=True) from None
    return declarations


def build_call(request: InferenceRequest, tenant: TenantConfig, budget: Budget | None = None) -> PreparedCall:
    """The model call for `request`; `budget` replaces the planned one (the retry after a context overflow)."""
    task = request.task
    if task not in PROMPT_VERSIONS:
        raise TaskFailure(
            TaskFailureCode.UNSUPPORTED_TASK, f"task {task.value!r} is not answered by a model call", rejected=True
        )
    if budget is None:
        output = request.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS[task]
        budget = budgets.plan(tenant.provider.context_window, output, answers=2 if task is Task.RCA else 1)
    if task is Task.CHAT:
        return PreparedCall(_model_call(request, tenant, budget, *_chat_turns(request)), PROMPT_VERSIONS[task], budget)
    if task is Task.RUNBOOK and request.tools:
        template = _template(task, runbook_tools(request))
    else:
        template = _constant_template(task)
    assert request.incident is not None  # guaranteed by InferenceRequest's validator
    view, text = budgets.fit_and_render(request.incident, max(0, budget.prompt_tokens - template.fixed_tokens))
    turn = Turn("user", f"{text}\n\n{INSTRUCTIONS[task]}")
    model_call = _model_call(request, tenant, budget, template.system, (turn,), **template.extra)
    return PreparedCall(model_call, PROMPT_VERSIONS[task], budget, view)


def repair_call(prepared: PreparedCall, raw_output: str | None, error: str, truncated: bool) -> ModelCall:
    """The one repair attempt: the original call, plus the unusable answer and what is wrong with it."""
    call = prepared.call
    if truncated:
        # The cut-off answer is not sent back: it cannot be completed and would only spend context.
        turns = (*call.turns, Turn("user", REPAIR_TRUNCATED))
    else:
        turns = (*call.turns, Turn("assistant", raw_output or ""), Turn("user", REPAIR_INVALID.format(error=error)))
    return replace(call, turns=turns)


def canonical(call: ModelCall) -> bytes:
    """A stable serialisation of a call, to show that the same request builds the same prompt."""
    return orjson.dumps(call, option=orjson.OPT_SORT_KEYS, default=_plain)


def _chat_turns(request: InferenceRequest) -> tuple[str, tuple[Turn, ...]]:
    messages = request.messages or []
    system = "\n".join(m.content for m in messages if m.role == "system") or SYSTEM_PROMPTS[Task.CHAT]
    turns = tuple(
        Turn(role=m.role, content=m.content, tool_call_id=m.tool_call_id) for m in messages if m.role != "system"
    )
    return system, turns


def _model_call(
    request: InferenceRequest,
    tenant: TenantConfig,
    budget: Budget,
    system: str,
    turns: tuple[Turn, ...],
    **extra: Any,
) -> ModelCall:
    return ModelCall(
        system=system,
        turns=turns,
        max_output_tokens=budget.max_output_tokens,
        timeout_s=tenant.limits.timeout_s,
        temperature=request.temperature,
        **extra,
    )


def _prompt_tokens(system: str, instruction: str, extra: dict[str, Any]) -> int:
    """Tokens of everything in an incident prompt except the incident text itself."""
    declared = ""
    if tools := extra.get("tools"):
        declared += _json([{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools])
    if schema := extra.get("output_schema"):
        declared += _json(schema.schema)  # also sent as the provider's response format
    return (
        budgets.estimate_tokens(system)
        + budgets.estimate_tokens(instruction)
        + budgets.estimate_tokens(declared)
        + 2 * budgets.MESSAGE_OVERHEAD_TOKENS
        + 2  # the blank line between the context and the instruction
    )


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()  # dicts keep their (deterministic) insertion order


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot serialise {type(value).__name__}")

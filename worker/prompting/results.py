"""Turns a model's raw result into the task's validated result, or says exactly why it cannot."""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import ValidationError

from contracts import IncidentContext, InferenceRequest, RcaResult, ReplyResult, Task, ToolCall, ToolDeclaration
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from worker.errors import ErrorClass, ProviderError
from worker.prompting import tool_schemas
from worker.prompting.tool_schemas import ToolSchemaError
from worker.providers.base import Finish, ModelResult


class TaskFailureCode(StrEnum):
    """Why a task has no valid result: the reply's `error.code`."""

    INVALID_OUTPUT = "invalid_output"
    TRUNCATED_OUTPUT = "truncated_output"
    CONTENT_FILTERED = "content_filtered"
    TOOLS_UNSUPPORTED = "tools_unsupported"
    EMPTY_OUTPUT = "empty_output"
    INVALID_TOOLS = "invalid_tools"  # the request's tool declarations, not the model's answer
    UNSUPPORTED_TASK = "unsupported_task"


REPAIRABLE = frozenset({TaskFailureCode.INVALID_OUTPUT, TaskFailureCode.TRUNCATED_OUTPUT})
# What providers say when a model cannot call tools (Ollama, Bedrock, Gemini, vLLM without a tool parser).
TOOLS_UNSUPPORTED = re.compile(
    r"(does not|doesn't|do not) support (tools|tool use|tool calling|function calling)"
    r"|tool(s| use| calling)? (is |are )?not supported|function calling is not (enabled|supported)"
    r"|enable-auto-tool-choice",
    re.IGNORECASE,
)


@dataclass
class TaskFailure(Exception):
    """The provider answered, but not with something we can pass on as a valid result."""

    code: TaskFailureCode
    message: str
    raw_output: str | None = None
    rejected: bool = False  # the request itself is wrong (reply `rejected`), not the model's answer

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def repairable(self) -> bool:
        return self.code in REPAIRABLE


def interpret(
    request: InferenceRequest, result: ModelResult, citable: Mapping[str, frozenset[int]] | None = None
) -> ReplyResult:
    """The reply's result for a model answer; `citable` are the incident positions the model was shown."""
    if result.finish is Finish.CONTENT_FILTER:
        raise TaskFailure(
            TaskFailureCode.CONTENT_FILTERED, "the provider's content filter withheld the answer", result.text
        )
    if request.task is Task.RCA:
        assert request.incident is not None
        return ReplyResult(rca=_rca(result, request.incident, citable))
    if request.task is Task.RUNBOOK:
        return ReplyResult(tool_calls=_tool_calls(request.tools or DEFAULT_RUNBOOK_TOOLS, result))
    if result.finish is Finish.LENGTH and not result.text:
        raise TaskFailure(TaskFailureCode.TRUNCATED_OUTPUT, "the model hit max_output_tokens before answering")
    if not result.text:
        raise TaskFailure(TaskFailureCode.EMPTY_OUTPUT, "the model returned no text")
    return ReplyResult(text=result.text)


def explain_provider_error(request: InferenceRequest, exc: ProviderError) -> ProviderError:
    """A provider's refusal of tool calling, said plainly for a runbook; any other error unchanged."""
    refused = exc.code == "tools_unsupported" or TOOLS_UNSUPPORTED.search(exc.message)
    if request.task is Task.RUNBOOK and exc.error_class is ErrorClass.BAD_REQUEST and refused:
        return ProviderError(
            ErrorClass.BAD_REQUEST,
            f"runbooks need a model with tool calling, and this one has none ({exc.message})",
            code="tools_unsupported",
            status=exc.status,
        )
    return exc


def _rca(result: ModelResult, incident: IncidentContext, citable: Mapping[str, frozenset[int]] | None) -> RcaResult:
    raw = _structured_text(result)
    if result.finish is Finish.LENGTH:
        raise TaskFailure(TaskFailureCode.TRUNCATED_OUTPUT, "the JSON answer was cut off at max_output_tokens", raw)
    if not raw.strip():
        raise TaskFailure(TaskFailureCode.INVALID_OUTPUT, "the model returned no JSON", raw)
    try:
        rca = RcaResult.model_validate_json(_json_part(raw))
    except ValidationError as exc:
        raise TaskFailure(
            TaskFailureCode.INVALID_OUTPUT, f"the answer does not match the RCA schema: {_first(exc)}", raw
        ) from None
    if (problem := _evidence_problem(rca, incident, citable)) is not None:
        raise TaskFailure(TaskFailureCode.INVALID_OUTPUT, problem, raw)
    return rca


def _structured_text(result: ModelResult) -> str:
    # Providers that request structured output as a forced tool may hand the object back as that tool's call.
    if not result.text and len(result.tool_calls) == 1:
        return orjson.dumps(result.tool_calls[0].arguments).decode()
    return result.text or ""


def _json_part(text: str) -> str:
    # Some self-hosted models wrap JSON in a markdown fence or a sentence even when asked not to.
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else text


def _evidence_problem(
    rca: RcaResult, incident: IncidentContext, citable: Mapping[str, frozenset[int]] | None
) -> str | None:
    sizes = {
        "timeline": len(incident.timeline),
        "alert": len(incident.alerts),
        "log": len(incident.logs),
        "metric": len(incident.metrics),
        "deploy": len(incident.deploys),
    }
    for c, cause in enumerate(rca.probable_causes):
        for e, ref in enumerate(cause.evidence):
            where = f"probable_causes.{c}.evidence.{e} cites [{ref.kind} {ref.index}]"
            if ref.index >= sizes[ref.kind]:
                return f"{where}, but the incident has {sizes[ref.kind]} {ref.kind} item(s)"
            if citable is not None and ref.index not in citable[ref.kind]:
                return f"{where}, which was left out to fit the context window and was not shown"
    return None


def _tool_calls(declarations: Sequence[ToolDeclaration], result: ModelResult) -> list[ToolCall]:
    if not result.tool_calls:
        if result.finish is Finish.LENGTH:
            raise TaskFailure(
                TaskFailureCode.TRUNCATED_OUTPUT, "the model hit max_output_tokens before calling any tool", result.text
            )
        if result.text:
            raise TaskFailure(
                TaskFailureCode.TOOLS_UNSUPPORTED,
                "the model answered in text instead of calling tools; runbooks need a model with tool calling",
                result.text,
            )
        raise TaskFailure(TaskFailureCode.EMPTY_OUTPUT, "the model returned neither tool calls nor text")
    schemas = {d.name: d.parameters for d in declarations}
    try:
        with tool_schemas.budget():
            for position, call in enumerate(result.tool_calls):
                _check_arguments(position, call, schemas, result.tool_calls)
    except ToolSchemaError as exc:
        message = f"validating tool-call arguments against the declared tools broke rule {exc.rule}: {exc.message}"
        raise TaskFailure(TaskFailureCode.INVALID_TOOLS, message, rejected=True) from None
    if result.finish is Finish.LENGTH:
        raise TaskFailure(
            TaskFailureCode.TRUNCATED_OUTPUT, "the runbook was cut off at max_output_tokens", _dump(result.tool_calls)
        )
    return list(result.tool_calls)


def _check_arguments(
    position: int, call: ToolCall, schemas: Mapping[str, Mapping[str, Any]], calls: tuple[ToolCall, ...]
) -> None:
    if call.name not in schemas:
        raise TaskFailure(
            TaskFailureCode.INVALID_OUTPUT, f"tool call {position} is to undeclared tool {call.name!r}", _dump(calls)
        )
    problem = tool_schemas.argument_error(schemas[call.name], call.arguments)
    if problem is not None:
        raise TaskFailure(
            TaskFailureCode.INVALID_OUTPUT,
            f"tool call {position} to {call.name!r} has invalid arguments {problem}",
            _dump(calls),
        )


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}"


def _dump(calls: tuple[ToolCall, ...]) -> str:
    return orjson.dumps([c.model_dump() for c in calls]).decode()

"""Turns a model's raw result into the task's validated result, or says exactly why it cannot."""

from dataclasses import dataclass

import jsonschema
import orjson
from pydantic import ValidationError

from contracts import InferenceRequest, RcaResult, ReplyResult, Task, ToolCall, ToolDeclaration
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from worker.providers.base import Finish, ModelResult


@dataclass
class TaskFailure(Exception):
    """The provider answered, but not with something we can pass on as a valid result."""

    code: str  # invalid_output | truncated_output | content_filtered | tools_unsupported | empty_output
    message: str
    raw_output: str | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def interpret(request: InferenceRequest, result: ModelResult) -> ReplyResult:
    if result.finish is Finish.CONTENT_FILTER:
        raise TaskFailure("content_filtered", "the provider's content filter withheld the answer")
    if request.task is Task.RCA:
        return ReplyResult(rca=_rca(result))
    if request.task is Task.RUNBOOK:
        return ReplyResult(tool_calls=_tool_calls(request.tools or DEFAULT_RUNBOOK_TOOLS, result))
    if result.finish is Finish.LENGTH and not result.text:
        raise TaskFailure("truncated_output", "the model hit max_output_tokens before answering")
    if not result.text:
        raise TaskFailure("empty_output", "the model returned no text")
    return ReplyResult(text=result.text)


def _rca(result: ModelResult) -> RcaResult:
    raw = result.text or ""
    if result.finish is Finish.LENGTH:
        raise TaskFailure("truncated_output", "the structured answer was cut at max_output_tokens", raw)
    try:
        return RcaResult.model_validate_json(_strip_fences(raw))
    except ValidationError as exc:
        raise TaskFailure("invalid_output", f"the answer does not match the RCA schema: {_first(exc)}", raw) from None


def _tool_calls(
    declarations: tuple[ToolDeclaration, ...] | list[ToolDeclaration], result: ModelResult
) -> list[ToolCall]:
    if not result.tool_calls:
        raise TaskFailure(
            "tools_unsupported" if result.text else "empty_output",
            "the model answered in text instead of calling tools; runbooks need a model with tool calling",
            result.text,
        )
    schemas = {d.name: d.parameters for d in declarations}
    for call in result.tool_calls:
        if call.name not in schemas:
            raise TaskFailure(
                "invalid_output", f"the model called an undeclared tool {call.name!r}", _dump(result.tool_calls)
            )
        try:
            jsonschema.validate(call.arguments, schemas[call.name])
        except jsonschema.ValidationError as exc:
            raise TaskFailure(
                "invalid_output", f"arguments of {call.name!r} are invalid: {exc.message}", _dump(result.tool_calls)
            ) from None
    return list(result.tool_calls)


def _strip_fences(text: str) -> str:
    # Some self-hosted models wrap JSON in a markdown fence even when asked not to.
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[-1].rsplit("```", 1)[0]
    return stripped


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}"


def _dump(calls: tuple[ToolCall, ...]) -> str:
    return orjson.dumps([c.model_dump() for c in calls]).decode()

"""The OpenAI Chat Completions wire format, shared by every compatible provider: request body and answer."""

from typing import Any

import orjson

from contracts import ToolCall
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish, ModelCall, ModelResult
from worker.providers.http import malformed

FINISH = {
    "stop": Finish.STOP,
    "stop_sequence": Finish.STOP,
    "eos_token": Finish.STOP,
    "length": Finish.LENGTH,
    "tool_calls": Finish.TOOL_CALLS,
    "function_call": Finish.TOOL_CALLS,
    "content_filter": Finish.CONTENT_FILTER,
}


def chat_body(call: ModelCall) -> dict[str, Any]:
    """The Chat Completions request body for a neutral call (model name added by the caller)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": call.system}]
    for turn in call.turns:
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.tool_call_id:
            message["tool_call_id"] = turn.tool_call_id
        if turn.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": orjson.dumps(c.arguments).decode()},
                }
                for c in turn.tool_calls
            ]
        messages.append(message)
    body: dict[str, Any] = {"messages": messages, "max_tokens": call.max_output_tokens}
    if call.temperature is not None:
        body["temperature"] = call.temperature
    if call.tools:
        body["tools"] = [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in call.tools
        ]
        if call.tool_choice in ("auto", "required", "none"):
            body["tool_choice"] = call.tool_choice
        else:
            body["tool_choice"] = {"type": "function", "function": {"name": call.tool_choice}}
    if call.output_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": call.output_schema.name, "schema": call.output_schema.schema},
        }
    return body


def parse_tool_arguments(raw: Any, who: str) -> dict[str, Any]:
    # Current servers send a JSON string; older TGI sent an object.
    if isinstance(raw, dict):
        return raw
    try:
        parsed = orjson.loads(raw or "{}")
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise ProviderError(
            ErrorClass.BAD_REQUEST,
            f"{who} returned tool arguments that are not JSON: {exc}",
            code="invalid_tool_arguments",
        ) from exc
    if not isinstance(parsed, dict):
        raise ProviderError(
            ErrorClass.BAD_REQUEST,
            f"{who} returned tool arguments that are not an object",
            code="invalid_tool_arguments",
        )
    return parsed


def parse_chat_response(data: Any, who: str) -> ModelResult:
    """Read a Chat Completions answer; raises ProviderError when it has not the expected shape."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        usage = data.get("usage") or {}
        calls = tuple(
            ToolCall(
                id=c.get("id"),
                name=c["function"]["name"],
                arguments=parse_tool_arguments(c["function"].get("arguments"), who),
            )
            for c in message.get("tool_calls") or ()
        )
        finish = FINISH.get(choice.get("finish_reason") or "stop", Finish.OTHER)
        if message.get("refusal"):
            finish = Finish.CONTENT_FILTER
        return ModelResult(
            text=message.get("content"),
            finish=Finish.TOOL_CALLS if calls and finish is Finish.STOP else finish,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            model=data.get("model"),
            tool_calls=calls,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise malformed(who, f"unexpected shape ({type(exc).__name__}: {exc})") from exc

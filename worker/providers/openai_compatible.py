"""OpenAI Chat Completions over HTTP: vLLM, TGI, Ollama's `/v1`, OpenAI itself (and Azure's body)."""

from typing import Any

import aiohttp
import orjson

from contracts import OpenAICompatibleSettings, ToolCall
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish, ModelCall, ModelInfo, ModelResult
from worker.providers.http import malformed, send_json
from worker.redaction import redact_url
from worker.secrets import resolve_secret

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


def tgi_response_format(body: dict[str, Any]) -> dict[str, Any]:
    """TGI's own grammar shape (`type` + `value`) for the schema OpenAI's shape carries."""
    schema = body["response_format"]["json_schema"]["schema"]
    return body | {"response_format": {"type": "json", "value": schema}}


def rejects_openai_response_format(error: ProviderError) -> bool:
    # TGI cannot deserialize OpenAI's `json_schema` shape: 422 "... response_format: missing field `value`".
    return error.status == 422 and "response_format" in error.message


class OpenAICompatibleProvider:
    """Calls `{base_url}/chat/completions` with an optional bearer key."""

    kind = "openai_compatible"

    def __init__(self, settings: OpenAICompatibleSettings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._tgi_grammar = False  # learned from the server's first refusal of OpenAI's response_format

    @property
    def endpoint(self) -> str:
        return redact_url(self._settings.base_url)

    @property
    def model(self) -> str:
        return self._settings.model

    @property
    def _who(self) -> str:
        return f"the OpenAI-compatible server at {self._settings.base_url}"

    def _headers(self) -> dict[str, str]:
        if self._settings.api_key is None:
            return {}
        return {"Authorization": f"Bearer {resolve_secret(self._settings.api_key)}"}

    async def complete(self, call: ModelCall) -> ModelResult:
        headers = self._headers()
        body = chat_body(call) | {"model": self._settings.model}
        if call.output_schema is not None and self._tgi_grammar:
            body = tgi_response_format(body)
        try:
            data = await self._post(body, headers, call.timeout_s)
        except ProviderError as exc:
            if call.output_schema is None or self._tgi_grammar or not rejects_openai_response_format(exc):
                raise
            self._tgi_grammar = True
            data = await self._post(tgi_response_format(body), headers, call.timeout_s)
        return parse_chat_response(data, self._who)

    async def _post(self, body: dict[str, Any], headers: dict[str, str], timeout_s: float) -> Any:
        return await send_json(
            self._session, "POST", self._url, who=self._who, timeout_s=timeout_s, body=body, headers=headers
        )

    async def describe(self, timeout_s: float) -> ModelInfo:
        """vLLM lists `max_model_len` under /v1/models; TGI reports `max_total_tokens` under /info."""
        base = self._settings.base_url.rstrip("/")
        listing = await send_json(
            self._session, "GET", f"{base}/models", headers=self._headers(), timeout_s=timeout_s, who=self._who
        )
        entries = [m for m in listing.get("data") or [] if isinstance(m, dict)]
        entry = next((m for m in entries if m.get("id") == self._settings.model), None)
        if entry is not None and isinstance(entry.get("max_model_len"), int):
            return ModelInfo(
                found=True, context_window=entry["max_model_len"], context_source="/v1/models max_model_len"
            )
        root = base.removesuffix("/v1")
        try:
            info = await send_json(self._session, "GET", f"{root}/info", timeout_s=timeout_s, who=self._who)
        except ProviderError:
            return ModelInfo(found=entry is not None or None)
        total = info.get("max_total_tokens") if isinstance(info, dict) else None
        if isinstance(total, int):
            return ModelInfo(found=True, context_window=total, context_source="/info max_total_tokens")
        return ModelInfo(found=entry is not None or None)

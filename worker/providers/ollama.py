"""Ollama's native `/api/chat` (non-streaming): tools, structured output through `format`, no tool choice."""

import re
from collections.abc import Mapping
from typing import Any

import aiohttp

from contracts import OllamaSettings, ToolCall
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish, ModelCall, ModelInfo, ModelResult
from worker.providers.http import classify_status, error_text, malformed, send_json
from worker.redaction import redact_url

FINISH = {"stop": Finish.STOP, "length": Finish.LENGTH}
NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d+)", re.MULTILINE)


def classify_ollama(status: int, payload: bytes, headers: Mapping[str, str], who: str, model: str) -> ProviderError:
    text = error_text(payload)
    if "does not support tools" in text:
        return ProviderError(
            ErrorClass.BAD_REQUEST,
            f"{status} from {who}: model {model} does not support tool calling; choose a model with the 'tools' "
            f"capability (see `ollama show {model}`) ({text})",
            code="tools_unsupported",
            status=status,
        )
    if status == 404:
        return ProviderError(
            ErrorClass.NOT_FOUND,
            f"404 from {who}: model {model} is not pulled on that server; run `ollama pull {model}` ({text})",
            code="model_not_found",
            status=status,
        )
    return classify_status(status, text, headers, who)


def chat_body(call: ModelCall, model: str, num_ctx: int | None) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": call.system}]
    names: dict[str, str] = {}  # tool_call_id -> tool name: Ollama labels tool results by name, not id
    for turn in call.turns:
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in turn.tool_calls]
            names.update({c.id: c.name for c in turn.tool_calls if c.id})
        if turn.role == "tool" and turn.tool_call_id in names:
            message["tool_name"] = names[turn.tool_call_id]
        messages.append(message)
    options: dict[str, Any] = {"num_predict": call.max_output_tokens}
    if call.temperature is not None:
        options["temperature"] = call.temperature
    if num_ctx is not None:
        # Without it Ollama uses a small default and silently drops what does not fit.
        options["num_ctx"] = num_ctx
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": False, "options": options}
    tools = call.tools
    if tools and call.tool_choice not in ("auto", "required", "none"):
        # No tool_choice in Ollama: offering only the named tool is the closest thing to forcing it.
        tools = tuple(t for t in tools if t.name == call.tool_choice) or tools
    if tools and call.tool_choice != "none":
        body["tools"] = [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in tools
        ]
    if call.output_schema is not None:
        body["format"] = call.output_schema.schema
    return body


def parse_chat(data: Any, who: str) -> ModelResult:
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        # An error can arrive under HTTP 200 (e.g. after the model started loading).
        raise classify_status(500, data["error"], {}, who)
    try:
        message = data["message"]
        calls = []
        for number, raw in enumerate(message.get("tool_calls") or ()):
            arguments = raw["function"].get("arguments") or {}
            if not isinstance(arguments, dict):
                raise TypeError("tool arguments are not an object")
            calls.append(
                ToolCall(id=raw.get("id") or f"call_{number}", name=raw["function"]["name"], arguments=arguments)
            )
        finish = FINISH.get(data.get("done_reason") or "stop", Finish.OTHER)
        return ModelResult(
            text=message.get("content") or None,
            # Ollama reports `stop` even when it called tools.
            finish=Finish.TOOL_CALLS if calls and finish is Finish.STOP else finish,
            input_tokens=int(data.get("prompt_eval_count") or 0),
            output_tokens=int(data.get("eval_count") or 0),
            model=data.get("model"),
            tool_calls=tuple(calls),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise malformed(who, f"unexpected shape ({type(exc).__name__}: {exc})") from exc


def endpoints(settings: OllamaSettings) -> list[str]:
    """Every URL a call or a description may reach: all of them lie under the base URL."""
    return [settings.base_url]


class OllamaProvider:
    """Calls `{base_url}/api/chat` with `stream: false`."""

    kind = "ollama"

    def __init__(self, settings: OllamaSettings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self._base = settings.base_url.rstrip("/")
        self._who = f"Ollama at {self._base}"

    @property
    def endpoint(self) -> str:
        return redact_url(self._settings.base_url)

    @property
    def model(self) -> str:
        return self._settings.model

    async def aclose(self) -> None:
        """Nothing of its own to release: connections belong to the shared session."""

    def _classify(self, status: int, payload: bytes, headers: Mapping[str, str], who: str) -> ProviderError:
        return classify_ollama(status, payload, headers, who, self._settings.model)

    async def complete(self, call: ModelCall) -> ModelResult:
        body = chat_body(call, self._settings.model, self._settings.context_window)
        data = await send_json(
            self._session,
            "POST",
            f"{self._base}/api/chat",
            body=body,
            who=self._who,
            classify=self._classify,
        )
        return parse_chat(data, self._who)

    async def describe(self) -> ModelInfo:
        """`/api/tags` says whether the model is pulled; `/api/show` gives its capabilities and context length."""
        tags = await send_json(self._session, "GET", f"{self._base}/api/tags", who=self._who)
        names = {m.get("name") for m in tags.get("models", [])} | {m.get("model") for m in tags.get("models", [])}
        wanted = self._settings.model
        if wanted not in names and f"{wanted}:latest" not in names:
            return ModelInfo(found=False)
        show = await send_json(
            self._session,
            "POST",
            f"{self._base}/api/show",
            body={"model": wanted},
            who=self._who,
            classify=self._classify,
        )
        context, source = None, None
        if match := NUM_CTX.search(str(show.get("parameters") or "")):
            context, source = int(match.group(1)), "/api/show parameters num_ctx"
        else:
            trained = [v for k, v in (show.get("model_info") or {}).items() if k.endswith(".context_length")]
            if trained and isinstance(trained[0], int):
                # The trained maximum; the server's effective num_ctx may be smaller unless the tenant sets it.
                context, source = trained[0], "/api/show model_info context_length"
        capabilities = show.get("capabilities")
        tools = "tools" in capabilities if isinstance(capabilities, list) else None
        return ModelInfo(found=True, context_window=context, context_source=source, tools=tools)

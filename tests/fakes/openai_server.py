"""A strict fake of the OpenAI Chat Completions API, with faults on command.

Checks what the real API checks: method and path, the bearer key, JSON body, a known model, message roles,
tool and response_format shapes, and (when `context_window` is set) that the prompt plus `max_tokens` fits.
Answers come from the demo stand-in model's deterministic generator, or from scripted `replies`.
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from demo.standin_model import completion

ToolSupport = Literal["native", "rejected", "ignored"]  # rejected: 400 like Ollama; ignored: answers in text
FaultKind = Literal["rate_limit", "server_error", "hang", "malformed", "context_overflow", "quota", "bad_request"]
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class Fault:
    kind: FaultKind
    retry_after_s: float | None = None


def prompt_tokens(body: dict[str, Any]) -> int:
    """What this fake counts as the prompt: the JSON bytes of messages, tools and response format, / 4."""
    sent = [body.get("messages"), body.get("tools"), body.get("response_format")]
    return len(orjson.dumps(sent)) // 4


def chat_completion(
    content: str | None = None,
    *,
    tool_calls: Sequence[tuple[str, Mapping[str, Any] | str]] | None = None,
    finish_reason: str | None = None,
    usage: tuple[int, int] = (100, 50),
    model: str = "fake-model",
) -> dict[str, Any]:
    """A scripted Chat Completions response body; tool arguments given as a dict are JSON-encoded."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{n}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": args if isinstance(args, str) else orjson.dumps(dict(args)).decode(),
                },
            }
            for n, (name, args) in enumerate(tool_calls)
        ]
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}
        ],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


def _error(status: int, message: str, type_: str, code: str | None = None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@dataclass
class FakeOpenAI:
    api_key: str | None = "sk-test-fake"
    model: str = "fake-model"
    latency_s: float = 0.0
    faults: deque[Fault] = field(default_factory=deque)  # consumed one per request, before answering
    always: Fault | None = None  # applied to every request while set
    fault_for: Callable[[dict[str, Any]], Fault | None] | None = None  # a fault chosen by the request's content
    requests: list[dict[str, Any]] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)  # monotonic clock, one per accepted request
    override: dict[str, Any] | None = None  # a full response body to return instead of the generated one
    replies: deque[dict[str, Any]] = field(default_factory=deque)  # scripted bodies, one per request, first
    context_window: int | None = None  # tokens, counted as the JSON bytes of the prompt / 4
    tools: ToolSupport = "native"
    quote_refused_key: bool = False  # a 401 that quotes the key it refused, as some gateways and proxies do
    _runner: web.AppRunner | None = None
    base_url: str = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # Hung handlers must not hold up shutdown.
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        presented = request.headers.get("Authorization", "")
        if presented != f"Bearer {self.api_key}":
            quoted = f": {presented.removeprefix('Bearer ')}" if self.quote_refused_key else "."
            return _error(401, f"Incorrect API key provided{quoted}", "invalid_request_error", "invalid_api_key")
        return None

    async def _models(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if request.content_type != "application/json":
            return _error(400, "Content-Type must be application/json", "invalid_request_error")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if (problem := self._shape_problem(body)) is not None:
            return _error(400, problem, "invalid_request_error")
        if body["model"] != self.model:
            return _error(
                404, f"The model `{body['model']}` does not exist", "invalid_request_error", "model_not_found"
            )
        self.requests.append(body)
        self.request_times.append(time.monotonic())
        fault = self.faults.popleft() if self.faults else self.always
        if fault is None and self.fault_for is not None:
            fault = self.fault_for(body)
        if fault is not None:
            return await self._fault(fault)
        if (refused := self._beyond_model(body)) is not None:
            return refused
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.replies:
            return web.json_response(self.replies.popleft())
        if self.tools == "ignored":
            body = {k: v for k, v in body.items() if k not in ("tools", "tool_choice")}
        return web.json_response(self.override or completion(body))

    def _beyond_model(self, body: dict[str, Any]) -> web.Response | None:
        if body.get("tools") and self.tools == "rejected":
            return _error(400, f"registry.ollama.ai/library/{self.model} does not support tools", "api_error")
        if self.context_window is None:
            return None
        prompt = prompt_tokens(body)
        requested = prompt + int(body.get("max_tokens") or 0)
        if requested <= self.context_window:
            return None
        message = (
            f"This model's maximum context length is {self.context_window} tokens. However, you requested "
            f"{requested} tokens ({prompt} in the messages, {body.get('max_tokens')} in the completion). "
            "Please reduce the length of the messages or completion."
        )
        return _error(400, message, "invalid_request_error", "context_length_exceeded")

    async def _fault(self, fault: Fault) -> web.StreamResponse:
        retry_after = {"retry-after": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else {}
        match fault.kind:
            case "rate_limit":
                return _error(
                    429, "Rate limit reached. Please try again later.", "requests", "rate_limit_exceeded", **retry_after
                )
            case "quota":
                return _error(429, "You exceeded your current quota.", "insufficient_quota", "insufficient_quota")
            case "server_error":
                return _error(503, "The server is overloaded.", "server_error", **retry_after)
            case "context_overflow":
                return _error(
                    400,
                    "This model's maximum context length is 8192 tokens.",
                    "invalid_request_error",
                    "context_length_exceeded",
                )
            case "bad_request":
                return _error(400, "Invalid value for 'temperature'.", "invalid_request_error")
            case "malformed":
                return web.Response(body=b'{"choices": [ {"mess', content_type="application/json")
            case "hang":
                await asyncio.sleep(3600)
        raise AssertionError(fault)

    @staticmethod
    def _shape_problem(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body must be a JSON object"
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty array"
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                return f"messages[{i}].role is invalid"
            if not isinstance(message.get("content"), str | None):
                return f"messages[{i}].content must be a string"
        for key in ("max_tokens", "max_completion_tokens"):
            if key in body and (not isinstance(body[key], int) or body[key] < 1):
                return f"'{key}' must be a positive integer"
        for tool in body.get("tools", []):
            function = tool.get("function", {}) if isinstance(tool, dict) else {}
            if tool.get("type") != "function" or not isinstance(function.get("name"), str):
                return "tools[].type must be 'function' with a function.name"
        response_format = body.get("response_format")
        if response_format is not None:
            kind = response_format.get("type")
            if kind == "json_schema" and not isinstance(response_format.get("json_schema", {}).get("schema"), dict):
                return "response_format.json_schema.schema must be an object"
            if kind not in ("text", "json_object", "json_schema"):
                return "response_format.type is invalid"
        return None

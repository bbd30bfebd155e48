"""A strict fake of Ollama's native API (`/api/chat`, `/api/tags`, `/api/show`), with faults on command.

Like Ollama it streams NDJSON unless `stream` is false, answers 404 for a model that is not pulled, refuses
tools for a model without the `tools` capability, and constrains output to a `format` schema.
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from demo.standin_model import completion
from tests.fakes.common import Fault, FaultQueue, LocalServer, openai_shaped

ROLES = {"system", "user", "assistant", "tool"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@dataclass
class FakeOllama:
    model: str = "llama3.1:8b"
    capabilities: list[str] = field(default_factory=lambda: ["completion", "tools"])
    context_length: int = 131072
    num_ctx: int | None = None  # a Modelfile `num_ctx`, reported by /api/show `parameters`
    faults: FaultQueue = field(default_factory=FaultQueue)
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: LocalServer = field(default_factory=LocalServer)

    @property
    def base_url(self) -> str:
        return self.server.url

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/chat", self._chat)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/show", self._show)
        app.router.add_get("/api/version", self._version)
        return await self.server.serve(app)

    async def close(self) -> None:
        await self.server.close()

    def _known(self, name: Any) -> bool:
        return name in (self.model, f"{self.model}:latest") or f"{name}:latest" == self.model

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.3"})

    async def _tags(self, request: web.Request) -> web.Response:
        details = {"family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}
        return web.json_response(
            {"models": [{"name": self.model, "model": self.model, "size": 4920753328, "details": details}]}
        )

    async def _show(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if not self._known(body.get("model") or body.get("name")):
            return _error(404, f"model '{body.get('model')}' not found")
        parameters = f"num_ctx                        {self.num_ctx}\n" if self.num_ctx else ""
        return web.json_response(
            {
                "parameters": parameters + 'stop                           "<|eot_id|>"',
                "details": {"family": "llama", "parameter_size": "8.0B"},
                "model_info": {"general.architecture": "llama", "llama.context_length": self.context_length},
                "capabilities": self.capabilities,
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "invalid character in request body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "model is required")
        if not self._known(body["model"]):
            return _error(404, f'model "{body["model"]}" not found, try pulling it first')
        for message in body.get("messages") or []:
            if message.get("role") not in ROLES:
                return _error(400, f"invalid role: {message.get('role')}")
        if body.get("tools") and "tools" not in self.capabilities:
            return _error(400, f"registry.ollama.ai/library/{self.model} does not support tools")
        self.requests.append(body)
        fault = self.faults.next()
        if fault is not None:
            return await self._fault(fault, body)
        answer = self._answer(body)
        if body.get("stream", True):
            # Ollama's default is a stream of NDJSON chunks; a client that forgets stream:false gets this.
            return web.Response(body=orjson.dumps(answer) + b"\n", content_type="application/x-ndjson")
        return web.json_response(answer)

    def _answer(self, body: dict[str, Any], done_reason: str = "stop") -> dict[str, Any]:
        shaped = openai_shaped(body["messages"], body.get("tools"), json_output=body.get("format") is not None)
        choice = completion(shaped)["choices"][0]["message"]
        message: dict[str, Any] = {"role": "assistant", "content": choice.get("content") or ""}
        if choice.get("tool_calls"):
            message["tool_calls"] = [
                {"function": {"name": c["function"]["name"], "arguments": orjson.loads(c["function"]["arguments"])}}
                for c in choice["tool_calls"]
            ]
        return {
            "model": body["model"],
            "created_at": "2026-11-26T12:00:00Z",
            "message": message,
            "done": True,
            "done_reason": done_reason,
            "total_duration": 1_200_000_000,
            "load_duration": 20_000_000,
            "prompt_eval_count": max(1, len(orjson.dumps(body["messages"])) // 4),
            "eval_count": max(1, len(orjson.dumps(message)) // 4),
        }

    async def _fault(self, fault: Fault, body: dict[str, Any]) -> web.StreamResponse:
        match fault.kind:
            case "rate_limit":
                headers = {"retry-after": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else None
                return _error(429, "too many requests", headers)
            case "server_error":
                return _error(500, "llama runner process has terminated: exit status 2")
            case "truncated":
                answer = self._answer(body, done_reason="length")
                answer["message"]["content"] = answer["message"]["content"][:40]
                return web.json_response(answer)
            case "malformed":
                return web.Response(body=b'{"model": "x", "message": {', content_type="application/json")
            case "hang":
                await asyncio.sleep(3600)
        raise AssertionError(f"the Ollama fake has no fault {fault.kind!r}")

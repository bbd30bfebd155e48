"""Strict fakes of the two self-hosted OpenAI-compatible servers and their quirks: vLLM and TGI.

vLLM: lists `max_model_len` under /v1/models and, unless started with `--enable-auto-tool-choice`, answers
400 to `tool_choice: "auto"` while named and `required` choices still work. TGI: takes `response_format`
only in its own `{"type": "json", "value": <schema>}` shape (422 otherwise), reports `/info`, and answers
errors as `{"error": "...", "error_type": "..."}`.
"""

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from demo.standin_model import completion
from tests.fakes.common import LocalServer


@dataclass
class FakeVLLM:
    model: str = "meta-llama/Llama-3.1-70B-Instruct"
    max_model_len: int = 131072
    auto_tool_choice: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: LocalServer = field(default_factory=LocalServer)

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        await self.server.serve(app)
        return self.base_url

    async def close(self) -> None:
        await self.server.close()

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model, "object": "model", "owned_by": "vllm", "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [entry]})

    async def _chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if body.get("model") != self.model:
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if body.get("tools") and body.get("tool_choice", "auto") == "auto" and not self.auto_tool_choice:
            return self._error(
                400,
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                "BadRequestError",
            )
        self.requests.append(body)
        return web.json_response(completion(body))

    @staticmethod
    def _error(status: int, message: str, kind: str) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status
        )


@dataclass
class FakeTGI:
    model_id: str = "mistralai/Mistral-7B-Instruct-v0.3"
    max_total_tokens: int = 32768
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: LocalServer = field(default_factory=LocalServer)

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/info", self._info)
        await self.server.serve(app)
        return self.base_url

    async def close(self) -> None:
        await self.server.close()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_id, "object": "model"}]})

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_id": self.model_id,
                "max_input_tokens": self.max_total_tokens - 1,
                "max_total_tokens": self.max_total_tokens,
            }
        )

    async def _chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        grammar = body.get("response_format")
        if grammar is not None:
            if "value" not in grammar or grammar.get("type") not in ("json", "json_object", "regex", "json_schema"):
                return web.json_response(
                    {
                        "error": "Failed to deserialize the JSON body into the target type: response_format: missing "
                        "field `value`",
                        "error_type": "validation",
                    },
                    status=422,
                )
            if body.get("tools"):
                return web.json_response(
                    {"error": "Grammar and tools are mutually exclusive", "error_type": "validation"}, status=422
                )
        self.requests.append(body)
        # The stand-in model recognises OpenAI's shape; TGI's model is the model whatever the body says.
        shaped = body | {"model": "tgi"}
        if grammar is not None:
            shaped["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": grammar["value"]},
            }
        return web.json_response(completion(shaped))

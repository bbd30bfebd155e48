"""A strict fake of Azure OpenAI's deployment endpoint (dated api-version), with faults on command.

Checks what Azure checks: the `api-key` header, the deployment in the path, a known `api-version` and the features
that version has (json_schema, max_completion_tokens). Answers like Azure, with content-filter annotations.
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from demo.standin_model import completion
from tests.fakes.common import Fault, FaultQueue, LocalServer

KNOWN_VERSIONS = {
    "2024-02-15-preview",
    "2024-03-01-preview",
    "2024-06-01",
    "2024-08-01-preview",
    "2024-09-01-preview",
    "2024-10-21",
    "2024-12-01-preview",
    "2025-01-01-preview",
}
NO_FILTER = {c: {"filtered": False, "severity": "safe"} for c in ("hate", "self_harm", "sexual", "violence")}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status, headers=headers)


@dataclass
class FakeAzureOpenAI:
    api_key: str = "azure-test-key"
    deployment: str = "gpt-4o"
    model: str = "gpt-4o-2024-08-06"
    faults: FaultQueue = field(default_factory=FaultQueue)
    requests: list[dict[str, Any]] = field(default_factory=list)
    api_versions: list[str] = field(default_factory=list)
    server: LocalServer = field(default_factory=LocalServer)

    @property
    def endpoint(self) -> str:
        return self.server.url + "/"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        return await self.server.serve(app)

    async def close(self) -> None:
        await self.server.close()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        version = request.query.get("api-version")
        if version is None:
            return _error(404, "404", "Resource not found")
        if request.headers.get("api-key") != self.api_key:
            return _error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
                "key for an active subscription and use a correct regional API endpoint for your resource.",
            )
        if version not in KNOWN_VERSIONS:
            return _error(404, "404", "Resource not found")
        if request.match_info["deployment"] != self.deployment:
            return _error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within the "
                "last 5 minutes, please wait a moment and try again.",
            )
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "BadRequest", "Could not parse the request body as JSON.")
        if (problem := self._shape_problem(body, version)) is not None:
            return _error(400, "BadRequest", problem)
        self.requests.append(body)
        self.api_versions.append(version)
        fault = self.faults.next()
        if fault is not None:
            return await self._fault(fault, body)
        return web.json_response(self._annotated(completion(body | {"model": self.model})))

    def _annotated(self, answer: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        answer["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": NO_FILTER}]
        for choice in answer["choices"]:
            choice["content_filter_results"] = NO_FILTER
            if finish is not None:
                choice["finish_reason"] = finish
        return answer

    async def _fault(self, fault: Fault, body: dict[str, Any]) -> web.StreamResponse:
        match fault.kind:
            case "rate_limit":
                seconds = fault.retry_after_s if fault.retry_after_s is not None else 6
                return _error(
                    429,
                    "429",
                    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
                    f"exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
                    f"{seconds:g} seconds.",
                    {"retry-after": f"{int(seconds) + 1}", "retry-after-ms": f"{int(seconds * 1000)}"},
                )
            case "server_error":
                return _error(503, "ServiceUnavailable", "The service is temporarily unable to process your request.")
            case "content_filter_prompt":
                return _error(
                    400,
                    "content_filter",
                    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
                    param="prompt",
                    innererror={
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": NO_FILTER | {"violence": {"filtered": True, "severity": "high"}},
                    },
                )
            case "content_filter":
                answer = self._annotated(completion(body | {"model": self.model}), finish="content_filter")
                answer["choices"][0]["message"] = {"role": "assistant", "content": None}
                return web.json_response(answer)
            case "truncated":
                answer = self._annotated(completion(body | {"model": self.model}), finish="length")
                content = answer["choices"][0]["message"].get("content") or ""
                answer["choices"][0]["message"]["content"] = content[: len(content) // 2]
                return web.json_response(answer)
            case "context_overflow":
                return _error(
                    400,
                    "context_length_exceeded",
                    "This model's maximum context length is 128000 tokens. However, your messages resulted in "
                    "130000 tokens. Please reduce the length of the messages.",
                )
            case "malformed":
                return web.Response(body=b'{"choices": [ {"mess', content_type="application/json")
            case "hang":
                await asyncio.sleep(3600)
        raise AssertionError(f"the Azure fake has no fault {fault.kind!r}")

    @staticmethod
    def _shape_problem(body: Any, version: str) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return "'messages' is a required property"
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema" and version < "2024-08-01":
            return "response_format value as json_schema is enabled only for api versions 2024-08-01-preview and later"
        if "max_completion_tokens" in body and version < "2024-09-01":
            return "Unrecognized request argument supplied: max_completion_tokens"
        for tool in body.get("tools", []):
            if tool.get("type") != "function" or not isinstance(tool.get("function", {}).get("name"), str):
                return "tools[].type must be 'function' with a function.name"
        return None

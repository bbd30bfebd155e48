"""Strict fakes of Bedrock Runtime's Converse API and of STS AssumeRole, reached through aioboto3's `endpoint_url`.

Both verify the SigV4 `Authorization` header the way AWS does: the credential scope must name the configured
region and the service (`bedrock`, `sts`), the access key must be known (static, or issued by the STS fake
with its session token), and the signature is recomputed over the signed headers and body. Converse
requests are checked per model family (system prompts, tool use, toolChoice) as the service does.
"""

import asyncio
import itertools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from demo.standin_model import completion
from tests.fakes.common import Fault, FaultQueue, LocalServer, openai_shaped

AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[^,]+), Signature=(?P<signature>[0-9a-f]{64})$"
)


@dataclass
class Identity:
    secret_access_key: str
    session_token: str | None = None


@dataclass
class Keyring:
    """Access keys the fake AWS accepts, shared by the STS and Bedrock fakes."""

    identities: dict[str, Identity] = field(default_factory=dict)

    def add(self, access_key_id: str, secret_access_key: str, session_token: str | None = None) -> None:
        self.identities[access_key_id] = Identity(secret_access_key, session_token)


def sigv4_problem(
    request: web.Request, body: bytes, keyring: Keyring, region: str, service: str
) -> tuple[str, str] | None:
    """(error code, message) when the request is not correctly signed for `service` in `region`."""
    match = AUTHORIZATION.match(request.headers.get("Authorization", ""))
    if match is None:
        return "MissingAuthenticationTokenException", "Missing Authentication Token"
    if match["region"] != region or match["service"] != service:
        return (
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region and service {service}, not "
            f"'{match['region']}/{match['service']}'.",
        )
    identity = keyring.identities.get(match["key"])
    if identity is None:
        return "UnrecognizedClientException", "The security token included in the request is invalid."
    if identity.session_token != request.headers.get("X-Amz-Security-Token"):
        return "UnrecognizedClientException", "The security token included in the request is invalid."
    signed = match["signed"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        return "IncompleteSignatureException", "host and x-amz-date must be signed"
    aws_request = AWSRequest(
        method=request.method,
        url=f"http://{request.host}{request.raw_path}",
        headers={name: request.headers.get(name, "") for name in signed},
        data=body,
    )
    aws_request.context["timestamp"] = request.headers.get("X-Amz-Date", "")
    signer = SigV4Auth(Credentials(match["key"], identity.secret_access_key, identity.session_token), service, region)
    canonical = signer.canonical_request(aws_request)
    expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
    if expected != match["signature"]:
        return (
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        )
    return None


def _aws_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"message": message},
        status=status,
        headers={"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/", **(headers or {})},
    )


def supports(model_id: str) -> tuple[bool, bool, set[str]]:
    """(system prompt, tool use, accepted toolChoice kinds) as the service enforces them per family."""
    base = model_id.rsplit("/", 1)[-1]
    if "titan" in base or "mistral-7b" in base or "mixtral" in base:
        return False, False, set()
    if "llama3-8b" in base or "llama3-70b" in base or "claude-v2" in base:
        return True, False, set()
    if "claude-3" in base or "claude-sonnet" in base or "nova" in base:
        return True, True, {"auto", "any", "tool"}
    return True, True, {"auto"}


@dataclass
class FakeBedrock:
    keyring: Keyring
    region: str = "eu-central-1"
    models: set[str] = field(default_factory=lambda: {"anthropic.claude-3-5-sonnet-20240620-v1:0"})
    faults: FaultQueue = field(default_factory=FaultQueue)
    requests: list[dict[str, Any]] = field(default_factory=list)
    access_keys_seen: list[str] = field(default_factory=list)
    server: LocalServer = field(default_factory=LocalServer)

    @property
    def endpoint_url(self) -> str:
        return self.server.url

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/model/{model_id}/converse", self._converse)
        return await self.server.serve(app)

    async def close(self) -> None:
        await self.server.close()

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if (problem := sigv4_problem(request, raw, self.keyring, self.region, "bedrock")) is not None:
            code, message = problem
            return _aws_error(403, code, message)
        self.access_keys_seen.append(AUTHORIZATION.match(request.headers["Authorization"])["key"])  # type: ignore[index]
        model_id = request.match_info["model_id"]
        if model_id not in self.models:
            return _aws_error(400, "ValidationException", "The provided model identifier is invalid.")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _aws_error(400, "SerializationException", "Could not parse the request body.")
        if (problem_text := self._shape_problem(body, model_id)) is not None:
            return _aws_error(400, "ValidationException", problem_text)
        self.requests.append(body)
        fault = self.faults.next()
        if fault is not None:
            return await self._fault(fault, body)
        return web.json_response(self._answer(body))

    def _answer(self, body: dict[str, Any], stop: str | None = None) -> dict[str, Any]:
        messages = [
            {"role": m["role"], "content": "".join(b.get("text", "") for b in m["content"])} for m in body["messages"]
        ]
        tool_config = body.get("toolConfig") or {}
        tools: list[dict[str, Any]] = [
            {
                "type": "function",
                "function": {"name": t["toolSpec"]["name"], "parameters": t["toolSpec"]["inputSchema"]["json"]},
            }
            for t in tool_config.get("tools", [])
        ]
        forced = (tool_config.get("toolChoice") or {}).get("tool")
        choice = {"type": "function", "function": {"name": forced["name"]}} if forced else None
        structured = len(tools) == 1 and tools[0]["function"]["name"] == "rca_result"
        blocks: list[dict[str, Any]] = []
        if structured:
            # A forced "rca_result" tool: answer with the structured RCA as its input, like Claude does.
            content = completion(openai_shaped(messages, json_output=True))["choices"][0]["message"]["content"]
            blocks.append(
                {"toolUse": {"toolUseId": "tooluse_rca", "name": "rca_result", "input": orjson.loads(content)}}
            )
        else:
            message = completion(openai_shaped(messages, tools, choice))["choices"][0]["message"]
            if message.get("content"):
                blocks.append({"text": message["content"]})
            for number, call in enumerate(message.get("tool_calls") or []):
                blocks.append(
                    {
                        "toolUse": {
                            "toolUseId": f"tooluse_{number}",
                            "name": call["function"]["name"],
                            "input": orjson.loads(call["function"]["arguments"]),
                        }
                    }
                )
        input_tokens = max(1, len(orjson.dumps(body["messages"])) // 4)
        output_tokens = max(1, len(orjson.dumps(blocks)) // 4)
        return {
            "output": {"message": {"role": "assistant", "content": blocks}},
            "stopReason": stop or ("tool_use" if any("toolUse" in b for b in blocks) else "end_turn"),
            "usage": {
                "inputTokens": input_tokens,
                "outputTokens": output_tokens,
                "totalTokens": input_tokens + output_tokens,
            },
            "metrics": {"latencyMs": 120},
        }

    async def _fault(self, fault: Fault, body: dict[str, Any]) -> web.StreamResponse:
        match fault.kind:
            case "rate_limit":
                headers = {"retry-after": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else None
                return _aws_error(
                    429, "ThrottlingException", "Too many requests, please wait before trying again.", headers
                )
            case "model_not_ready":
                return _aws_error(429, "ModelNotReadyException", "Model is not ready to serve inference requests.")
            case "server_error":
                return _aws_error(503, "ServiceUnavailableException", "Bedrock is unable to process your request.")
            case "forbidden":
                return _aws_error(
                    403, "AccessDeniedException", "You don't have access to the model with the specified model ID."
                )
            case "quota":
                return _aws_error(
                    400, "ServiceQuotaExceededException", "Your request exceeds the service quota for your account."
                )
            case "context_overflow":
                return _aws_error(400, "ValidationException", "Input is too long for requested model.")
            case "truncated":
                answer = self._answer(body, stop="max_tokens")
                return web.json_response(answer)
            case "content_filter":
                answer = self._answer(body, stop="guardrail_intervened")
                answer["output"]["message"]["content"] = [{"text": "Sorry, the model cannot answer this."}]
                return web.json_response(answer)
            case "malformed":
                return web.Response(body=b'{"output": {"message": ', content_type="application/json")
            case "hang":
                await asyncio.sleep(3600)
        raise AssertionError(f"the Bedrock fake has no fault {fault.kind!r}")

    @staticmethod
    def _shape_problem(body: Any, model_id: str) -> str | None:
        system_ok, tools_ok, choices = supports(model_id)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return "A conversation must start with a user message."
        if messages[0].get("role") != "user":
            return "A conversation must start with a user message."
        for i, message in enumerate(messages):
            if message.get("role") not in ("user", "assistant") or not message.get("content"):
                return f"messages.{i}: role must be user or assistant with non-empty content"
            if i and message["role"] == messages[i - 1]["role"]:
                return "A conversation must alternate between user and assistant roles."
        if (body.get("inferenceConfig") or {}).get("maxTokens", 1) < 1:
            return "inferenceConfig.maxTokens must be at least 1"
        temperature = (body.get("inferenceConfig") or {}).get("temperature", 0)
        if not 0 <= temperature <= 1:
            return "inferenceConfig.temperature must be between 0 and 1"
        if body.get("system") and not system_ok:
            return "This model doesn't support system messages. Try again without a system message."
        tool_config = body.get("toolConfig")
        if tool_config is not None:
            if not tools_ok:
                return "This model doesn't support tool use."
            for tool in tool_config.get("tools", []):
                spec = tool.get("toolSpec", {})
                if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", spec.get("name", "")) or "json" not in spec.get(
                    "inputSchema", {}
                ):
                    return "toolConfig.tools: each toolSpec needs a valid name and inputSchema.json"
            kind = next(iter(tool_config.get("toolChoice") or {"auto": {}}))
            if kind not in choices:
                return (
                    f"This model doesn't support the toolConfig.toolChoice.{kind} field. "
                    "Remove toolConfig.toolChoice and try again."
                )
        return None


@dataclass
class FakeSTS:
    """AssumeRole over the query protocol, answering XML like sts.amazonaws.com."""

    keyring: Keyring
    region: str = "eu-central-1"
    roles: dict[str, str | None] = field(default_factory=dict)  # role ARN -> required external id
    lifetime: timedelta = timedelta(hours=1)
    assumed: list[dict[str, str]] = field(default_factory=list)
    faults: FaultQueue = field(default_factory=FaultQueue)
    server: LocalServer = field(default_factory=LocalServer)
    _counter: "itertools.count[int]" = field(default_factory=itertools.count)

    @property
    def endpoint_url(self) -> str:
        return self.server.url

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/", self._action)
        return await self.server.serve(app)

    async def close(self) -> None:
        await self.server.close()

    async def _action(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if (problem := sigv4_problem(request, raw, self.keyring, self.region, "sts")) is not None:
            return self._error(403, "Sender", problem[0], problem[1])
        form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        if form.get("Action") != "AssumeRole" or form.get("Version") != "2011-06-15":
            return self._error(400, "Sender", "InvalidAction", f"Could not find operation {form.get('Action')}")
        fault = self.faults.next()
        if fault is not None and fault.kind == "rate_limit":
            return self._error(400, "Sender", "Throttling", "Rate exceeded")
        if fault is not None and fault.kind == "server_error":
            return self._error(503, "Receiver", "ServiceUnavailable", "Service is unavailable")
        if fault is not None:
            raise AssertionError(f"the STS fake has no fault {fault.kind!r}")
        role = form.get("RoleArn", "")
        if role not in self.roles or self.roles[role] != form.get("ExternalId"):
            return self._error(
                403, "Sender", "AccessDenied", f"User is not authorized to perform: sts:AssumeRole on resource: {role}"
            )
        number = next(self._counter)
        key, secret, token = f"ASIAFAKE{number:08d}", f"assumed-secret-{number}", f"session-token-{number}"
        self.keyring.add(key, secret, token)
        self.assumed.append(form)
        expires = (datetime.now(UTC) + self.lifetime).strftime("%Y-%m-%dT%H:%M:%SZ")
        xml = f"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>{key}</AccessKeyId>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <SessionToken>{token}</SessionToken>
      <Expiration>{expires}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <AssumedRoleId>AROAFAKE:{form.get("RoleSessionName")}</AssumedRoleId>
      <Arn>{role.replace(":role/", ":assumed-role/")}/{form.get("RoleSessionName")}</Arn>
    </AssumedRoleUser>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>fake-{number}</RequestId></ResponseMetadata>
</AssumeRoleResponse>"""
        return web.Response(text=xml, content_type="text/xml")

    @staticmethod
    def _error(status: int, kind: str, code: str, message: str) -> web.Response:
        xml = (
            f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>{kind}</Type>'
            f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>fake</RequestId></ErrorResponse>"
        )
        return web.Response(text=xml, status=status, content_type="text/xml")

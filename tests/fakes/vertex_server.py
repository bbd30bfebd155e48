"""A strict fake of Vertex AI `generateContent` and of the OAuth token endpoint a service account names.

The token endpoint verifies the JWT assertion's RS256 signature with the public half of the key it was given,
checks issuer, audience, scope and expiry, and issues a bearer token; `generateContent` accepts only tokens
it issued. Requests are checked for Gemini's shapes (contents, systemInstruction, tools, toolConfig,
generationConfig with responseJsonSchema) and answered with the demo stand-in model's content.
"""

import asyncio
import base64
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from demo.standin_model import completion
from tests.fakes.common import Fault, FaultQueue, LocalServer, openai_shaped

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"
MODES = {"AUTO", "ANY", "NONE", "VALIDATED"}


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_json(key: rsa.RSAPrivateKey, token_uri: str, project: str = "acme-prod") -> str:
    """A service-account key file as Google issues it, for a key generated in the test."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return orjson.dumps(
        {
            "type": "service_account",
            "project_id": project,
            "private_key_id": "0123456789abcdef",
            "private_key": pem,
            "client_email": f"atlas-worker@{project}.iam.gserviceaccount.com",
            "client_id": "100000000000000000001",
            "token_uri": token_uri,
        }
    ).decode()


def _ref_with_siblings(schema: Any) -> str | None:
    """Vertex: "If $ref is set on a sub-schema, no other properties, except those starting with $, may be set"."""
    if isinstance(schema, list):
        return next((p for p in map(_ref_with_siblings, schema) if p), None)
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema and any(not k.startswith("$") for k in schema):
        return f"responseJsonSchema: $ref {schema['$ref']} has sibling keywords"
    return next((p for p in map(_ref_with_siblings, schema.values()) if p), None)


def _status(code: int, status: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "status": status}}, status=code, headers=headers
    )


@dataclass
class FakeVertex:
    public_key: rsa.RSAPublicKey
    client_email: str = "atlas-worker@acme-prod.iam.gserviceaccount.com"
    project: str = "acme-prod"
    location: str = "europe-west4"
    model: str = "gemini-2.5-flash"
    faults: FaultQueue = field(default_factory=FaultQueue)
    requests: list[dict[str, Any]] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    server: LocalServer = field(default_factory=LocalServer)
    _counter: "itertools.count[int]" = field(default_factory=itertools.count)

    @property
    def base_url(self) -> str:
        return self.server.url

    @property
    def token_uri(self) -> str:
        return self.server.url + "/token"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post(
            "/v1/projects/{project}/locations/{location}/publishers/google/models/{model_action}", self._generate
        )
        return await self.server.serve(app)

    async def close(self) -> None:
        await self.server.close()

    def revoke_all(self) -> None:
        """Tokens issued so far stop working, as when a token expires or is revoked server-side."""
        self.revoked.update(self.tokens_issued)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        problem = self._assertion_problem(str(form.get("assertion", "")))
        if problem is not None:
            return web.json_response({"error": "invalid_grant", "error_description": problem}, status=400)
        token = f"ya29.fake-{next(self._counter)}"
        self.tokens_issued.append(token)
        return web.json_response({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _assertion_problem(self, assertion: str) -> str | None:
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header, claims = orjson.loads(_b64decode(header_b64)), orjson.loads(_b64decode(claims_b64))
            self.public_key.verify(
                _b64decode(signature_b64),
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return "Invalid JWT Signature."
        except (ValueError, orjson.JSONDecodeError):
            return "Invalid JWT."
        now = time.time()
        if header.get("alg") != "RS256":
            return "Invalid JWT: alg must be RS256."
        if claims.get("iss") != self.client_email:
            return "Invalid JWT: unknown issuer."
        # google-auth always names Google's token endpoint as the audience, whatever token_uri says.
        if claims.get("aud") not in (self.token_uri, GOOGLE_TOKEN_ENDPOINT):
            return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe (aud)."
        if SCOPE not in str(claims.get("scope", "")).split():
            return "Invalid OAuth scope or ID token audience provided."
        if not claims.get("iat", 0) - 300 <= now <= claims.get("exp", 0) or claims["exp"] - claims["iat"] > 3600:
            return "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
        return None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ")
        if not authorization.startswith("Bearer ") or token not in self.tokens_issued or token in self.revoked:
            return _status(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            )
        info = request.match_info
        model, _, action = info["model_action"].partition(":")
        if action != "generateContent":
            return _status(404, "NOT_FOUND", f"Method {action} not found.")
        if info["project"] != self.project:
            return _status(403, "PERMISSION_DENIED", f"Permission denied on resource project {info['project']}.")
        if info["location"] != self.location or model != self.model:
            return _status(
                404,
                "NOT_FOUND",
                f"Publisher Model `projects/{info['project']}/locations/{info['location']}/publishers/google/models/"
                f"{model}` was not found or your project does not have access to it.",
            )
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _status(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if (problem := self._shape_problem(body)) is not None:
            return _status(400, "INVALID_ARGUMENT", problem)
        self.requests.append(body)
        fault = self.faults.next()
        if fault is not None:
            return await self._fault(fault, body)
        return web.json_response(self._answer(body))

    def _answer(self, body: dict[str, Any], finish: str = "STOP") -> dict[str, Any]:
        messages = [
            {"role": "user" if c["role"] == "user" else "assistant", "content": p.get("text", "")}
            for c in body["contents"]
            for p in c["parts"]
        ]
        tools = [
            {"type": "function", "function": {"name": d["name"], "parameters": d.get("parametersJsonSchema", {})}}
            for group in body.get("tools", [])
            for d in group.get("functionDeclarations", [])
        ]
        config = body.get("toolConfig", {}).get("functionCallingConfig", {})
        allowed = config.get("allowedFunctionNames") or []
        choice = {"type": "function", "function": {"name": allowed[0]}} if len(allowed) == 1 else None
        if config.get("mode") == "NONE":
            tools = []
        generation = body.get("generationConfig", {})
        shaped = openai_shaped(messages, tools, choice, json_output="responseJsonSchema" in generation)
        message = completion(shaped)["choices"][0]["message"]
        parts: list[dict[str, Any]] = []
        if message.get("content"):
            parts.append({"text": message["content"]})
        for call in message.get("tool_calls") or []:
            parts.append(
                {
                    "functionCall": {
                        "name": call["function"]["name"],
                        "args": orjson.loads(call["function"]["arguments"]),
                    }
                }
            )
        prompt_tokens = max(1, len(orjson.dumps(body["contents"])) // 4)
        output_tokens = max(1, len(orjson.dumps(parts)) // 4)
        return {
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish}],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens,
            },
            "modelVersion": f"{self.model}-001",
            "responseId": "fake-response",
        }

    async def _fault(self, fault: Fault, body: dict[str, Any]) -> web.StreamResponse:
        match fault.kind:
            case "rate_limit":
                headers = {"retry-after": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else None
                return _status(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "Resource exhausted. Please try again later. Please refer to "
                    "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details.",
                    headers,
                )
            case "server_error":
                return _status(503, "UNAVAILABLE", "The service is currently unavailable.")
            case "forbidden":
                return _status(
                    403, "PERMISSION_DENIED", "Permission 'aiplatform.endpoints.predict' denied on resource."
                )
            case "context_overflow":
                return _status(
                    400,
                    "INVALID_ARGUMENT",
                    "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
                )
            case "truncated":
                answer = self._answer(body, finish="MAX_TOKENS")
                part = answer["candidates"][0]["content"]["parts"][0]
                part["text"] = part.get("text", "")[:40]
                return web.json_response(answer)
            case "content_filter":
                answer = self._answer(body, finish="SAFETY")
                answer["candidates"][0]["content"] = {"role": "model", "parts": []}
                return web.json_response(answer)
            case "content_filter_prompt":
                return web.json_response(
                    {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {"promptTokenCount": 9}}
                )
            case "malformed":
                return web.Response(body=b'{"candidates": [{"content": ', content_type="application/json")
            case "hang":
                await asyncio.sleep(3600)
        raise AssertionError(f"the Vertex fake has no fault {fault.kind!r}")

    @staticmethod
    def _shape_problem(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Invalid JSON payload received."
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "Unable to submit request because it must include at least one parts field."
        for i, content in enumerate(contents):
            if content.get("role") not in ("user", "model") or not content.get("parts"):
                return f"contents[{i}]: role must be user or model and parts must not be empty"
        if "system_instruction" in body and "systemInstruction" in body:
            return "systemInstruction given twice"
        generation = body.get("generationConfig", {})
        if "responseJsonSchema" in generation and generation.get("responseMimeType") != "application/json":
            return "responseJsonSchema requires responseMimeType application/json"
        if "responseJsonSchema" in generation and "responseSchema" in generation:
            return "responseSchema and responseJsonSchema are mutually exclusive"
        for group in body.get("tools", []):
            for declaration in group.get("functionDeclarations", []):
                if "parameters" in declaration and "parametersJsonSchema" in declaration:
                    return "parameters and parametersJsonSchema are mutually exclusive"
        if (problem := _ref_with_siblings(generation.get("responseJsonSchema"))) is not None:
            return problem
        mode = body.get("toolConfig", {}).get("functionCallingConfig", {}).get("mode")
        if mode is not None and mode not in MODES:
            return f"Invalid value at 'tool_config.function_calling_config.mode' ({mode})"
        return None

"""AWS Bedrock Runtime through the Converse API (aioboto3): static keys or an assumed role, per-family features."""

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aioboto3
import aiohttp
import orjson
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.httpsession import ProxyConfiguration
from botocore.parsers import ResponseParserError

from contracts import BedrockSettings, ToolCall
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish, ModelCall, ModelResult, StructuredOutputMode, ToolSpec
from worker.providers.egress import egress_error
from worker.providers.http import CONNECT_TIMEOUT_S, CONTEXT_OVERFLOW_PATTERNS, retry_after_seconds
from worker.redaction import redact_url
from worker.secrets import resolve_secret

log = structlog.get_logger("worker.providers.bedrock")

ROLE_SESSION_NAME = "atlas-inference-worker"
ROLE_DURATION_S = 3600
STS_TIMEOUT_S = 30.0
REFRESH_BEFORE = timedelta(minutes=5)  # re-assume the role this long before its credentials expire
FINISH = {
    "end_turn": Finish.STOP,
    "stop_sequence": Finish.STOP,
    "tool_use": Finish.TOOL_CALLS,
    "max_tokens": Finish.LENGTH,
    "guardrail_intervened": Finish.CONTENT_FILTER,
    "content_filtered": Finish.CONTENT_FILTER,
}
ToolChoiceSupport = Literal["tool", "any", "auto"]


@dataclass(frozen=True, slots=True)
class Family:
    """What a Bedrock model family supports through Converse (AWS "supported models and features" table)."""

    name: str
    system_prompt: bool
    tools: bool
    tool_choice: ToolChoiceSupport  # the strongest toolChoice it accepts
    context_window: int | None


# First match wins; patterns apply to the base model id (no ARN, no inference-profile region prefix).
FAMILIES: tuple[tuple[re.Pattern[str], Family], ...] = tuple(
    (re.compile(pattern), family)
    for pattern, family in (
        (r"^anthropic\.claude-(v2|instant)", Family("Anthropic Claude 2", True, False, "auto", 100_000)),
        (r"^anthropic\.claude-", Family("Anthropic Claude 3+", True, True, "tool", 200_000)),
        (r"^amazon\.nova-premier", Family("Amazon Nova Premier", True, True, "tool", 1_000_000)),
        (r"^amazon\.nova-micro", Family("Amazon Nova Micro", True, True, "tool", 128_000)),
        (r"^amazon\.nova-", Family("Amazon Nova", True, True, "tool", 300_000)),
        (r"^amazon\.titan-text-premier", Family("Amazon Titan Text Premier", False, False, "auto", 32_000)),
        (r"^amazon\.titan-text-lite", Family("Amazon Titan Text Lite", False, False, "auto", 4_096)),
        (r"^amazon\.titan-", Family("Amazon Titan Text", False, False, "auto", 8_192)),
        (r"^meta\.llama3-2-(1|3)b", Family("Meta Llama 3.2 1B/3B", True, False, "auto", 128_000)),
        (r"^meta\.llama3-(1|2|3)-", Family("Meta Llama 3.1+", True, True, "auto", 128_000)),
        (r"^meta\.llama4-", Family("Meta Llama 4", True, True, "auto", 128_000)),
        (r"^meta\.llama3-", Family("Meta Llama 3", True, False, "auto", 8_192)),
        (r"^meta\.llama2", Family("Meta Llama 2", True, False, "auto", 4_096)),
        (r"^mistral\.(mistral-7b|mixtral-8x7b)", Family("Mistral 7B / Mixtral", False, False, "auto", 32_000)),
        (r"^mistral\.mistral-large-2402", Family("Mistral Large", True, True, "any", 32_000)),
        (r"^mistral\.mistral-large", Family("Mistral Large 2", True, True, "any", 128_000)),
        (r"^cohere\.command-r", Family("Cohere Command R", True, True, "auto", 128_000)),
        (r"^cohere\.command", Family("Cohere Command", True, False, "auto", 4_000)),
        (r"^ai21\.jamba", Family("AI21 Jamba", True, True, "auto", 256_000)),
    )
)
UNKNOWN_FAMILY = Family("unknown", True, True, "auto", None)  # let the service say what it refuses
PROFILE_PREFIX = re.compile(r"^(us|eu|apac|us-gov|ca|jp|au|global)\.")


def base_model_id(model_id: str) -> str:
    """`arn:…:inference-profile/us.anthropic.claude-…` → `anthropic.claude-…`."""
    return PROFILE_PREFIX.sub("", model_id.rsplit("/", 1)[-1])


def family_of(model_id: str) -> Family:
    base = base_model_id(model_id)
    return next((family for pattern, family in FAMILIES if pattern.match(base)), UNKNOWN_FAMILY)


def classify_client_error(exc: ClientError, who: str) -> ProviderError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")[:500]
    metadata = exc.response.get("ResponseMetadata", {})
    status = int(metadata.get("HTTPStatusCode") or 0) or None
    retry_after = retry_after_seconds(metadata.get("HTTPHeaders") or {})
    text = f"{code}: {message}"
    if code == "ValidationException":
        return _rejected(message, text, who, status)
    if code == "ServiceQuotaExceededException":
        return ProviderError(
            ErrorClass.QUOTA, f"{who}: service quota exceeded ({text})", code="quota_exceeded", status=status
        )
    if code in THROTTLED:
        return ProviderError(
            ErrorClass.RATE_LIMITED,
            f"{who}: throttled ({text})",
            code="rate_limited",
            retry_after_s=retry_after,
            status=status,
        )
    if code in UNAVAILABLE:
        return ProviderError(
            ErrorClass.TRANSIENT,
            f"{who}: {text}",
            code="provider_unavailable",
            retry_after_s=retry_after,
            status=status,
        )
    return _refused(code, text, who, status, retry_after)


THROTTLED = frozenset({"ThrottlingException", "ModelNotReadyException", "TooManyRequestsException", "Throttling"})
UNAVAILABLE = frozenset(
    {"InternalServerException", "ServiceUnavailableException", "ModelTimeoutException", "ModelErrorException"}
)
CREDENTIALS_REJECTED = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "IncompleteSignature",
    }
)


def _rejected(message: str, text: str, who: str, status: int | None) -> ProviderError:
    """A ValidationException, told apart by what it says."""
    if CONTEXT_OVERFLOW_PATTERNS.search(message) or "too many input tokens" in message.lower():
        return ProviderError(
            ErrorClass.CONTEXT_OVERFLOW, f"{who}: prompt too long ({text})", code="context_overflow", status=status
        )
    if re.search(r"(doesn't|does not) support tool", message, re.IGNORECASE):
        return ProviderError(
            ErrorClass.BAD_REQUEST,
            f"{who}: this model does not support tool use; choose e.g. Claude 3+, Nova, Llama 3.1+ ({text})",
            code="tools_unsupported",
            status=status,
        )
    if "model identifier is invalid" in message.lower():
        return ProviderError(
            ErrorClass.NOT_FOUND,
            f"{who}: no such model; check model_id and that the model is offered in the region ({text})",
            code="model_not_found",
            status=status,
        )
    if "inference profile" in message.lower():
        return ProviderError(
            ErrorClass.BAD_REQUEST,
            f"{who}: this model needs an inference profile; set model_id to the profile id, e.g. us.<model id> "
            f"({text})",
            code="inference_profile_required",
            status=status,
        )
    return ProviderError(ErrorClass.BAD_REQUEST, f"{who}: request rejected ({text})", code="bad_request", status=status)


def _refused(code: str, text: str, who: str, status: int | None, retry_after: float | None) -> ProviderError:
    """Access, credentials and missing models; then whatever the status says."""
    if code == "AccessDeniedException":
        return ProviderError(
            ErrorClass.AUTH,
            f"{who}: access denied; the identity needs bedrock:InvokeModel on this model and the model must be "
            f"enabled under Bedrock model access ({text})",
            code="forbidden",
            status=status,
        )
    if code in CREDENTIALS_REJECTED:
        return ProviderError(
            ErrorClass.AUTH,
            f"{who}: the AWS credentials were rejected; check access_key_id / secret_access_key or role_arn ({text})",
            code="unauthorized",
            status=status,
        )
    if code == "ResourceNotFoundException":
        return ProviderError(
            ErrorClass.NOT_FOUND,
            f"{who}: model not found; check model_id and the region ({text})",
            code="model_not_found",
            status=status,
        )
    if status is not None and (status == 429 or status >= 500):
        return ProviderError(
            ErrorClass.RATE_LIMITED if status == 429 else ErrorClass.TRANSIENT,
            f"{who}: {status} {text}",
            code="rate_limited" if status == 429 else "provider_unavailable",
            retry_after_s=retry_after,
            status=status,
        )
    return ProviderError(ErrorClass.BAD_REQUEST, f"{who}: {text}", code="bad_request", status=status)


def _tool_config(tools: tuple[ToolSpec, ...], choice: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tools": [
            {
                "toolSpec": {
                    "name": t.name,
                    "description": t.description or t.name,
                    "inputSchema": {"json": t.parameters},
                }
            }
            for t in tools
        ]
    }
    if choice is not None:
        config["toolChoice"] = choice
    return config


def _choice(requested: str, family: Family) -> dict[str, Any] | None:
    """The strongest toolChoice the family accepts for what was asked (None: leave it to the model)."""
    if requested == "auto" or family.tool_choice == "auto":
        return None
    if requested == "required":
        return {"any": {}}
    return {"tool": {"name": requested}} if family.tool_choice == "tool" else {"any": {}}


def _alternating(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Converse wants user and assistant turns to alternate: results of parallel tool calls share one turn."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {"role": message["role"], "content": merged[-1]["content"] + message["content"]}
        else:
            merged.append(message)
    return merged


def _messages(call: ModelCall) -> list[dict[str, Any]]:
    """The turns as Converse messages: tool results are user turns, tool calls are toolUse blocks."""
    messages: list[dict[str, Any]] = []
    for turn in call.turns:
        if turn.role == "tool":
            block: dict[str, Any] = {
                "toolResult": {"toolUseId": turn.tool_call_id or "", "content": [{"text": turn.content}]}
            }
            messages.append({"role": "user", "content": [block]})
            continue
        content: list[dict[str, Any]] = [{"text": turn.content}] if turn.content else []
        content += [
            {"toolUse": {"toolUseId": c.id or c.name, "name": c.name, "input": c.arguments}} for c in turn.tool_calls
        ]
        messages.append({"role": turn.role, "content": content or [{"text": " "}]})
    return _alternating(messages)


def converse_request(call: ModelCall, model_id: str, family: Family) -> dict[str, Any]:
    """The Converse parameters for a neutral call. Structured output travels as a forced tool."""
    system = call.system
    if call.output_schema is not None and family.tools and family.tool_choice == "auto" and not call.tools:
        # The tool cannot be forced for this family, so the prompt has to ask for it.
        system += f"\n\nGive your whole answer by calling the {call.output_schema.name} tool, and nothing else."
    if call.output_schema is not None and not family.tools:
        # No tools, so no forced tool: the schema has to travel in the prompt and the answer is plain text.
        system += (
            "\n\nReply with one JSON object matching this JSON Schema, and nothing else:\n"
            + orjson.dumps(call.output_schema.schema).decode()
        )
    messages = _messages(call)
    if not family.system_prompt and messages and messages[0]["role"] == "user":
        # Titan and Mistral 7B reject a system prompt; it goes ahead of the first user turn instead.
        messages[0] = {"role": "user", "content": [{"text": system}, *messages[0]["content"]]}
    inference: dict[str, Any] = {"maxTokens": call.max_output_tokens}
    if call.temperature is not None:
        inference["temperature"] = min(call.temperature, 1.0)  # Converse's range is 0–1
    request: dict[str, Any] = {"modelId": model_id, "messages": messages, "inferenceConfig": inference}
    if family.system_prompt:
        request["system"] = [{"text": system}]
    if call.tools and call.tool_choice != "none":
        request["toolConfig"] = _tool_config(call.tools, _choice(call.tool_choice, family))
    elif call.output_schema is not None and family.tools:
        tool = ToolSpec(call.output_schema.name, "Return the answer as this tool's input.", call.output_schema.schema)
        request["toolConfig"] = _tool_config((tool,), _choice(tool.name, family))
    return request


def parse_converse(response: dict[str, Any], call: ModelCall, model_id: str, who: str) -> ModelResult:
    try:
        blocks = response["output"]["message"]["content"]
        usage = response.get("usage") or {}
        stop = response.get("stopReason") or "end_turn"
        text = "".join(b["text"] for b in blocks if "text" in b)
        calls = tuple(
            ToolCall(id=b["toolUse"].get("toolUseId"), name=b["toolUse"]["name"], arguments=b["toolUse"]["input"])
            for b in blocks
            if "toolUse" in b
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProviderError(
            ErrorClass.TRANSIENT, f"{who} returned an unexpected answer shape ({exc})", code="malformed_response"
        ) from exc
    if stop == "model_context_window_exceeded":
        raise ProviderError(
            ErrorClass.CONTEXT_OVERFLOW,
            f"{who}: the conversation filled the model's context window",
            code="context_overflow",
        )
    finish = FINISH.get(stop, Finish.OTHER)
    schema = call.output_schema
    if schema is not None and not call.tools:
        # The forced tool's input is the structured answer; it is the result's text, like other providers'.
        forced = next((c for c in calls if c.name == schema.name), None)
        if forced is not None:
            text, calls = orjson.dumps(forced.arguments).decode(), ()
            finish = Finish.LENGTH if finish is Finish.LENGTH else Finish.STOP
    return ModelResult(
        text=text or None,
        finish=finish,
        input_tokens=int(usage.get("inputTokens") or 0),
        output_tokens=int(usage.get("outputTokens") or 0),
        model=model_id,  # Converse does not echo the model
        tool_calls=calls,
    )


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    expires_at: datetime | None = None

    def fresh(self) -> bool:
        return self.expires_at is None or datetime.now(UTC) < self.expires_at - REFRESH_BEFORE


class _NoProxies(ProxyConfiguration):
    """botocore would route through an environment proxy; the egress policy must see the provider itself."""

    def proxy_url_for(self, url: str) -> str | None:  # type: ignore[override]
        return None

    def proxy_headers_for(self, proxy_url: str) -> dict[str, str]:
        return {}


def http_session_class(session: aiohttp.ClientSession) -> type[AIOHTTPSession]:
    """An aiobotocore HTTP session class that sends through the worker's own (egress-guarded) aiohttp session,
    so Bedrock and STS calls are checked, capped and never redirected like every other provider call."""

    class SharedSession(AIOHTTPSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._proxy_config = _NoProxies()

        async def _get_session(self, proxy_url: str | None) -> aiohttp.ClientSession:
            return session  # not entered into this object's exit stack: the worker closes it

    return SharedSession


def _aws_host(service: str, region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://{service}.{region}.{suffix}"


def endpoints(settings: BedrockSettings) -> list[str]:
    """Bedrock Runtime, then STS when a role is assumed: the URLs the clients are opened on."""
    urls = [settings.endpoint_url or _aws_host("bedrock-runtime", settings.region)]
    if settings.role_arn:
        urls.append(settings.sts_endpoint_url or _aws_host("sts", settings.region))
    return urls


@dataclass(slots=True)
class _HeldClient:
    """A Bedrock Runtime client signed with one set of credentials, and the calls using it right now."""

    credentials: AwsCredentials
    client: Any
    stack: contextlib.AsyncExitStack
    users: int = 0
    retired: bool = False


class BedrockProvider:
    """Calls Converse on `bedrock-runtime` in the tenant's region, with its own or an assumed identity.

    One aioboto3 client serves every call while the credentials stay the same; new assumed-role credentials
    get a new client, and the old one is closed once the calls using it have finished. Connections come from
    the worker's HTTP session, which also applies the egress policy.
    """

    kind = "bedrock"

    def __init__(self, settings: BedrockSettings, session: aiohttp.ClientSession) -> None:
        if settings.role_arn is None and (settings.access_key_id is None or settings.secret_access_key is None):
            # Falling back to the worker's own AWS identity would spend the operator's account on a tenant.
            raise ProviderError(
                ErrorClass.AUTH,
                "bedrock needs access_key_id and secret_access_key, or role_arn",
                code="config_invalid",
            )
        self._settings = settings
        self._endpoints = endpoints(settings)
        self._family = family_of(settings.model_id)
        self._session = aioboto3.Session()
        self._http_session_class = http_session_class(session)
        self._credentials: AwsCredentials | None = None
        self._lock = asyncio.Lock()
        self._client: _HeldClient | None = None
        self._client_lock = asyncio.Lock()
        self._closed = False
        self._who = f"Bedrock ({settings.model_id} in {settings.region})"

    @property
    def endpoint(self) -> str:
        return redact_url(self._endpoints[0])

    @property
    def model(self) -> str:
        return self._settings.model_id

    @property
    def family(self) -> Family:
        return self._family

    @property
    def known_context_window(self) -> int | None:
        """The family table's context window (None for a model no family matches)."""
        return self._family.context_window

    @property
    def structured_output(self) -> StructuredOutputMode:
        return "schema" if self._family.tools else "none"

    def _config(self) -> AioConfig:
        # One attempt: the tenant's fallback policy, not botocore, decides about retries. No read timeout: the
        # call's timeout is applied around the whole call (`worker.providers.bounded`).
        return AioConfig(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=None,
            retries={"mode": "standard", "total_max_attempts": 1},
            http_session_cls=self._http_session_class,
        )

    async def credentials(self) -> AwsCredentials:
        """Static keys, or the role's temporary credentials, re-assumed shortly before they expire."""
        async with self._lock:
            if self._credentials is not None and self._credentials.fresh():
                return self._credentials
            settings = self._settings
            static = None
            if settings.access_key_id is not None and settings.secret_access_key is not None:
                static = AwsCredentials(
                    resolve_secret(settings.access_key_id), resolve_secret(settings.secret_access_key)
                )
            if settings.role_arn is None:
                assert static is not None
                self._credentials = static
            else:
                self._credentials = await self._assume_role(settings.role_arn, static)
            return self._credentials

    async def _assume_role(self, role_arn: str, source: AwsCredentials | None) -> AwsCredentials:
        settings = self._settings
        params: dict[str, Any] = {
            "RoleArn": role_arn,
            "RoleSessionName": ROLE_SESSION_NAME,
            "DurationSeconds": ROLE_DURATION_S,
        }
        if settings.external_id is not None:
            params["ExternalId"] = resolve_secret(settings.external_id)
        keys: dict[str, Any] = {}
        if source is not None:
            keys = {"aws_access_key_id": source.access_key_id, "aws_secret_access_key": source.secret_access_key}
        who = f"AWS STS (assuming {role_arn})"
        try:
            # Assuming the role is bounded on its own: it is shared by every call until the credentials expire.
            async with (
                asyncio.timeout(STS_TIMEOUT_S),
                self._session.client(
                    "sts", region_name=settings.region, endpoint_url=self._endpoints[1], config=self._config(), **keys
                ) as sts,
            ):
                answer = await sts.assume_role(**params)
        except ClientError as exc:
            raise _assume_role_error(exc, who) from None
        except (BotoCoreError, TimeoutError) as exc:
            raise self._transport_error(exc, who) from None
        c = answer["Credentials"]
        expires = c["Expiration"]
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        return AwsCredentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], expires)

    def _transport_error(self, exc: BaseException, who: str) -> ProviderError:
        if (refused := egress_error(exc, who)) is not None:
            return refused
        if isinstance(exc, NoCredentialsError):
            return ProviderError(ErrorClass.CONFIG, f"{who}: no AWS credentials to sign with", code="secret_unresolved")
        if isinstance(exc, ResponseParserError):
            return ProviderError(ErrorClass.TRANSIENT, f"{who} returned a malformed body", code="malformed_response")
        if isinstance(exc, ReadTimeoutError | TimeoutError):
            return ProviderError(
                ErrorClass.TRANSIENT, f"{who} did not answer within {STS_TIMEOUT_S:g}s", code="timeout"
            )
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            return ProviderError(ErrorClass.TRANSIENT, f"cannot connect to {who}", code="unreachable")
        return ProviderError(ErrorClass.TRANSIENT, f"{who} failed: {type(exc).__name__}", code="unreachable")

    async def complete(self, call: ModelCall) -> ModelResult:
        family = self._family
        if call.tools and call.tool_choice != "none" and not family.tools:
            raise ProviderError(
                ErrorClass.BAD_REQUEST,
                f"{self._who}: {family.name} models do not support tool use through Converse; runbooks need a "
                "model that does (Claude 3+, Nova, Llama 3.1+, Mistral Large, Command R)",
                code="tools_unsupported",
            )
        creds = await self.credentials()
        request = converse_request(call, self._settings.model_id, family)
        try:
            async with self._leased(creds) as client:
                response: dict[str, Any] = dict(await client.converse(**request))
        except ClientError as exc:
            error = classify_client_error(exc, self._who)
            if error.code == "unauthorized" and creds.expires_at is not None:
                self._credentials = None  # an assumed role revoked or expired early: assume it again next time
            raise error from None
        except (BotoCoreError, TimeoutError) as exc:
            raise self._transport_error(exc, self._who) from None
        return parse_converse(response, call, self._settings.model_id, self._who)

    @contextlib.asynccontextmanager
    async def _leased(self, creds: AwsCredentials) -> AsyncIterator[Any]:
        """The client for these credentials, held open until this call is done with it."""
        held = await self._client_for(creds)
        try:
            yield held.client
        finally:
            held.users -= 1
            if held.retired and held.users == 0:
                await asyncio.shield(held.stack.aclose())

    async def _client_for(self, creds: AwsCredentials) -> _HeldClient:
        async with self._client_lock:
            held = self._client
            if held is None or held.credentials is not creds:
                if held is not None:
                    await self._retire(held)
                held = await self._open(creds)
                if self._closed:
                    held.retired = True  # a call that arrives after closing gets a client of its own
                else:
                    self._client = held
            held.users += 1
            return held

    async def _open(self, creds: AwsCredentials) -> _HeldClient:
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            self._session.client(
                "bedrock-runtime",
                region_name=self._settings.region,
                endpoint_url=self._endpoints[0],
                aws_access_key_id=creds.access_key_id,
                aws_secret_access_key=creds.secret_access_key,
                aws_session_token=creds.session_token,
                config=self._config(),
            )
        )
        log.info("bedrock_client_opened", endpoint=self.endpoint, model=self._settings.model_id)
        return _HeldClient(creds, client, stack)

    @staticmethod
    async def _retire(held: _HeldClient) -> None:
        held.retired = True
        if held.users == 0:
            await held.stack.aclose()

    async def aclose(self) -> None:
        """Close the client; a call still using it closes it when it is done."""
        async with self._client_lock:
            self._closed = True
            held, self._client = self._client, None
            if held is not None:
                await self._retire(held)


def _assume_role_error(exc: ClientError, who: str) -> ProviderError:
    error = classify_client_error(exc, who)
    if error.error_class is ErrorClass.BAD_REQUEST or error.code == "forbidden":
        # AccessDenied from STS means the trust policy or the external id does not match.
        return ProviderError(
            ErrorClass.AUTH,
            f"{who}: cannot assume the role; check role_arn, its trust policy and external_id "
            f"({exc.response.get('Error', {}).get('Code')})",
            code="assume_role_failed",
            status=error.status,
        )
    return error

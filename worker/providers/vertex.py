"""Google Vertex AI Gemini `generateContent`, authorised by a service-account key through google-auth."""

import asyncio
import concurrent.futures
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import google.auth.exceptions
import google.auth.transport
import orjson
from google.oauth2 import service_account

from contracts import ToolCall, VertexSettings
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish, ModelCall, ModelResult
from worker.providers.egress import egress_error
from worker.providers.http import classify_status, json_object, malformed, retry_after_seconds, send_json
from worker.redaction import redact_url
from worker.secrets import resolve_secret

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
TOKEN_TIMEOUT_S = 30.0
TOKEN_WHO = "the service account's token endpoint"
LOCATION = re.compile(r"[a-z][a-z0-9-]{1,40}")
FINISH = {
    "STOP": Finish.STOP,
    "MAX_TOKENS": Finish.LENGTH,
    "SAFETY": Finish.CONTENT_FILTER,
    "RECITATION": Finish.CONTENT_FILTER,
    "BLOCKLIST": Finish.CONTENT_FILTER,
    "PROHIBITED_CONTENT": Finish.CONTENT_FILTER,
    "SPII": Finish.CONTENT_FILTER,
    "IMAGE_SAFETY": Finish.CONTENT_FILTER,
}


def classify_vertex(status: int, payload: bytes, headers: Mapping[str, str], who: str) -> ProviderError:
    error = json_object(payload).get("error")
    error = error if isinstance(error, dict) else {}
    text = " ".join(str(error[k]) for k in ("status", "message") if error.get(k)) or payload[:300].decode(
        "utf-8", "replace"
    )
    if status == 429:
        # RESOURCE_EXHAUSTED on Vertex is per-minute quota or shared capacity: worth retrying with backoff.
        return ProviderError(
            ErrorClass.RATE_LIMITED,
            f"429 from {who}: rate limited or out of per-minute quota ({text})",
            code="rate_limited",
            status=status,
            retry_after_s=retry_after_seconds(headers),
        )
    if status == 401:
        return ProviderError(
            ErrorClass.AUTH,
            f"401 from {who}: the access token was rejected; check service_account ({text})",
            code="unauthorized",
            status=status,
        )
    if status == 403:
        return ProviderError(
            ErrorClass.AUTH,
            f"403 from {who}: the service account needs the Vertex AI User role and the Vertex AI API must be "
            f"enabled in the project ({text})",
            code="forbidden",
            status=status,
        )
    if status == 404:
        return ProviderError(
            ErrorClass.NOT_FOUND,
            f"404 from {who}: check the model name and that it is offered in the location ({text})",
            code="model_not_found",
            status=status,
        )
    return classify_status(status, text, headers, who)


# The JSON Schema keywords Vertex documents for responseJsonSchema / parametersJsonSchema.
SCHEMA_KEYWORDS = frozenset(
    {"$id", "$defs", "$ref", "$anchor", "type", "format", "title", "description", "enum", "items", "prefixItems"}
    | {"minItems", "maxItems", "minimum", "maximum", "anyOf", "oneOf", "properties", "additionalProperties"}
    | {"required", "propertyOrdering"}
)


def gemini_schema(schema: Any) -> Any:
    """The schema cut to what Vertex supports; the answer is validated against the full schema afterwards."""
    if isinstance(schema, list):
        return [gemini_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:  # a $ref may have only $-keywords beside it
        return {k: v for k, v in schema.items() if k.startswith("$")}
    kept: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in SCHEMA_KEYWORDS:
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):
            kept[key] = {name: gemini_schema(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf", "oneOf", "prefixItems", "additionalProperties"):
            kept[key] = gemini_schema(value)
        else:
            kept[key] = value
    return kept


def _contents(call: ModelCall) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # Gemini answers a function call by name, not by id
    for turn in call.turns:
        if turn.role == "tool":
            name = names.get(turn.tool_call_id or "", turn.tool_call_id or "tool")
            try:
                response = orjson.loads(turn.content)
            except orjson.JSONDecodeError:
                response = turn.content
            if not isinstance(response, dict):
                response = {"content": response}
            contents.append({"role": "user", "parts": [{"functionResponse": {"name": name, "response": response}}]})
            continue
        parts: list[dict[str, Any]] = [{"text": turn.content}] if turn.content else []
        for c in turn.tool_calls:
            parts.append({"functionCall": {"name": c.name, "args": c.arguments}})
            if c.id:
                names[c.id] = c.name
        contents.append({"role": "model" if turn.role == "assistant" else "user", "parts": parts or [{"text": ""}]})
    # Responses to parallel function calls belong in one turn, after the turn that made the calls.
    merged: list[dict[str, Any]] = []
    for content in contents:
        if merged and merged[-1]["role"] == content["role"]:
            merged[-1] = {"role": content["role"], "parts": merged[-1]["parts"] + content["parts"]}
        else:
            merged.append(content)
    return merged


def generate_body(call: ModelCall) -> dict[str, Any]:
    generation: dict[str, Any] = {"maxOutputTokens": call.max_output_tokens}
    if call.temperature is not None:
        generation["temperature"] = call.temperature
    if call.output_schema is not None:
        generation["responseMimeType"] = "application/json"
        generation["responseJsonSchema"] = gemini_schema(call.output_schema.schema)
    body: dict[str, Any] = {
        "systemInstruction": {"parts": [{"text": call.system}]},
        "contents": _contents(call),
        "generationConfig": generation,
    }
    if call.tools:
        body["tools"] = [
            {
                "functionDeclarations": [
                    {"name": t.name, "description": t.description, "parametersJsonSchema": gemini_schema(t.parameters)}
                    for t in call.tools
                ]
            }
        ]
        config: dict[str, Any] = {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE"}.get(call.tool_choice)}
        if config["mode"] is None:
            config = {"mode": "ANY", "allowedFunctionNames": [call.tool_choice]}
        body["toolConfig"] = {"functionCallingConfig": config}
    return body


def parse_generate(data: Any, who: str) -> ModelResult:
    try:
        usage = data.get("usageMetadata") or {}
        input_tokens = int(usage.get("promptTokenCount") or 0)
        # Thinking tokens are billed as output and count against maxOutputTokens.
        output_tokens = int(usage.get("candidatesTokenCount") or 0) + int(usage.get("thoughtsTokenCount") or 0)
        candidates = data.get("candidates") or []
        if not candidates:
            if (data.get("promptFeedback") or {}).get("blockReason"):
                return ModelResult(None, Finish.CONTENT_FILTER, input_tokens, output_tokens, data.get("modelVersion"))
            raise KeyError("candidates")
        candidate = candidates[0]
        parts = (candidate.get("content") or {}).get("parts") or []
        text = "".join(p["text"] for p in parts if "text" in p and not p.get("thought"))
        calls = tuple(
            ToolCall(
                id=p["functionCall"].get("id") or f"call_{n}",
                name=p["functionCall"]["name"],
                arguments=p["functionCall"].get("args") or {},
            )
            for n, p in enumerate(parts)
            if "functionCall" in p
        )
        finish = FINISH.get(candidate.get("finishReason") or "STOP", Finish.OTHER)
        return ModelResult(
            text=text or None,
            # A function call ends with STOP; the parts say what happened.
            finish=Finish.TOOL_CALLS if calls and finish is Finish.STOP else finish,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            model=data.get("modelVersion"),
            tool_calls=calls,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise malformed(who, f"unexpected shape ({type(exc).__name__}: {exc})") from exc


class _TokenResponse(google.auth.transport.Response):
    def __init__(self, status: int, headers: Mapping[str, str], data: bytes) -> None:
        self._status, self._headers, self._data = status, headers, data

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def data(self) -> bytes:
        return self._data


class LoopTransport(google.auth.transport.Request):
    """google-auth's HTTP transport, called from its refresh thread, sending through the worker's aiohttp session
    on the event loop: the token request gets the same egress policy, no redirects and the same response cap."""

    def __init__(self, session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop) -> None:
        self._session = session
        self._loop = loop
        self._sending: set[concurrent.futures.Future[_TokenResponse]] = set()
        self._cancelled = False

    def cancel(self) -> None:
        """Cut short the requests in flight, and refuse any later one (google-auth retries a 5xx after sleeping in
        its thread), so the refresh thread ends now, not at the requests' timeout."""
        self._cancelled = True
        for sending in list(self._sending):
            sending.cancel()

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _TokenResponse:
        if self._cancelled:
            raise concurrent.futures.CancelledError
        sent = self._send(url, method, body, headers, timeout or TOKEN_TIMEOUT_S)
        sending = asyncio.run_coroutine_threadsafe(sent, self._loop)
        self._sending.add(sending)
        if self._cancelled:  # cancelled between the check above and the request being registered
            sending.cancel()
        try:
            return sending.result()  # a cancelled request raises here, and so ends the refresh
        finally:
            self._sending.discard(sending)

    async def _send(
        self, url: str, method: str, body: bytes | None, headers: Mapping[str, str] | None, timeout_s: float
    ) -> _TokenResponse:
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                return _TokenResponse(response.status, dict(response.headers), await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            if (refused := egress_error(exc, TOKEN_WHO)) is not None:
                raise refused from None
            raise google.auth.exceptions.TransportError(type(exc).__name__) from None  # type: ignore[no-untyped-call]


def _short(detail: object) -> str:
    """google-auth copies the token endpoint's whole error body into its exception: keep a line of it."""
    return str(detail).replace("\n", " ")[:200]


# Google's service-account keys are 2048-bit RSA: 1,704 characters as the PKCS#8 PEM of a key file. Loading a key
# validates it, for a time that grows steeply with its size (30 ms at 2048 bits on the machine of
# docs/PERFORMANCE.md, 217 ms at 4096, 34 s at 16,384), and cryptography holds the GIL meanwhile, so no thread
# would spare the loop: a larger key, which a draft from a message could carry, is refused unread.
MAX_PRIVATE_KEY_CHARS = 2_000


def _check_key_size(info: object) -> None:
    private_key = info.get("private_key") if isinstance(info, dict) else None
    if isinstance(private_key, str) and len(private_key) > MAX_PRIVATE_KEY_CHARS:
        raise ProviderError(
            ErrorClass.CONFIG,
            f"service_account's private_key is {len(private_key):,} characters; a service-account key is a 2048-bit "
            f"RSA key of about 1,700",
            code="service_account_invalid",
        )


class ServiceAccountToken:
    """An OAuth access token for a service account, cached until google-auth considers it stale.

    google-auth refreshes with blocking code, so the refresh runs in a thread; its HTTP goes back to the event
    loop through `LoopTransport`. The lock makes concurrent calls share one refresh instead of each fetching one.
    """

    def __init__(self, read_key: Callable[[], str], session: aiohttp.ClientSession) -> None:
        self._read_key = read_key
        self._session = session
        self._key: str | None = None
        self._credentials: service_account.Credentials | None = None
        self._lock = asyncio.Lock()
        # Its own thread, not the loop's shared pool: refreshes waiting on a slow token endpoint (a draft's may be
        # a tarpit) must not hold the threads that render prompts and mask dead letters for every tenant.
        self._refresher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="atlas-token")

    def close(self) -> None:
        self._refresher.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: str) -> service_account.Credentials:
        try:
            info = orjson.loads(key)
            _check_key_size(info)
            credentials: service_account.Credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[SCOPE]
            )
            return credentials
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                ErrorClass.CONFIG,
                f"service_account is not a valid service-account JSON key ({type(exc).__name__})",
                code="service_account_invalid",
            ) from None

    async def get(self, *, stale: str | None = None) -> str:
        """A valid token; `stale` is one the server refused, refreshed unless another call already did."""
        async with self._lock:
            current = self._credentials
            if current is not None and current.valid and (stale is None or current.token != stale):
                return str(current.token)
            # Read the key again before each refresh, so a rotated key file is picked up without a restart.
            key = self._read_key()
            if self._credentials is None or key != self._key:
                self._credentials, self._key = self._load(key), key
            credentials = self._credentials
            try:
                loop = asyncio.get_running_loop()
                transport = LoopTransport(self._session, loop)
                try:
                    await loop.run_in_executor(self._refresher, credentials.refresh, transport)
                except asyncio.CancelledError:  # the call timed out or the worker stops: free the thread too
                    transport.cancel()
                    raise
            except google.auth.exceptions.RefreshError as exc:
                if getattr(exc, "retryable", False):
                    raise ProviderError(
                        ErrorClass.TRANSIENT, f"the token endpoint failed; try again ({_short(exc.args[0])})"
                    ) from None
                raise ProviderError(
                    ErrorClass.AUTH,
                    f"the service account key was rejected by its token endpoint: check service_account "
                    f"({_short(exc.args[0])})",
                    code="unauthorized",
                ) from None
            except google.auth.exceptions.TransportError as exc:
                raise ProviderError(
                    ErrorClass.TRANSIENT,
                    f"cannot reach the service account's token endpoint: {type(exc).__name__}",
                    code="unreachable",
                ) from None
            return str(credentials.token)


def endpoints(settings: VertexSettings) -> list[str]:
    """The API's base URL, then the token endpoint named in the key (google-auth posts the signed assertion there).

    The `global` location has no regional host: it is served by `aiplatform.googleapis.com` itself.
    """
    host = "aiplatform.googleapis.com"
    if settings.location != "global":
        host = f"{settings.location}-{host}"
    urls = [(settings.base_url or f"https://{host}").rstrip("/")]
    try:
        key = orjson.loads(settings.service_account.get_secret_value())
    except orjson.JSONDecodeError:
        key = None
    if isinstance(key, dict) and isinstance(key.get("token_uri"), str):
        urls.append(key["token_uri"])
    return urls


class VertexProvider:
    """Calls `…/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent`."""

    kind = "vertex"

    def __init__(self, settings: VertexSettings, session: aiohttp.ClientSession) -> None:
        if not LOCATION.fullmatch(settings.location):
            raise ProviderError(
                ErrorClass.BAD_REQUEST,
                f"location {settings.location!r} is not a Google Cloud location such as europe-west4 or global",
                code="config_invalid",
            )
        self._settings = settings
        self._session = session
        self._base = endpoints(settings)[0]
        self._url = (
            f"{self._base}/v1/projects/{quote(settings.project, safe='')}/locations/{quote(settings.location, safe='')}"
            f"/publishers/google/models/{quote(settings.model, safe='')}:generateContent"
        )
        self._who = f"Vertex AI ({settings.model} in {settings.project}/{settings.location})"
        self._tokens = ServiceAccountToken(lambda: resolve_secret(settings.service_account, lines=True), session)

    @property
    def endpoint(self) -> str:
        return redact_url(self._base)

    @property
    def model(self) -> str:
        return self._settings.model

    async def aclose(self) -> None:
        """The token cache's refresh thread; it holds no connection of its own."""
        self._tokens.close()

    async def complete(self, call: ModelCall) -> ModelResult:
        tokens = self._tokens
        body = generate_body(call)
        refused: str | None = None
        for attempt in (1, 2):
            token = await tokens.get(stale=refused)
            try:
                data = await send_json(
                    self._session,
                    "POST",
                    self._url,
                    body=body,
                    headers={"Authorization": f"Bearer {token}"},
                    who=self._who,
                    classify=classify_vertex,
                )
            except ProviderError as exc:
                # A token revoked or expired early: refresh once, as the reference advises for OAuth.
                if exc.status == 401 and attempt == 1:
                    refused = token
                    continue
                raise
            return parse_generate(data, self._who)
        raise AssertionError("unreachable")

"""HTTP helpers shared by the JSON-over-HTTP providers: error classification and retry-after parsing."""

import asyncio
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from worker.errors import ErrorClass, ProviderError
from worker.json_entries import exceeds
from worker.providers.egress import egress_error

CONTEXT_OVERFLOW_PATTERNS = re.compile(
    r"context_length_exceeded|maximum context length|longer than the maximum model length"
    r"|must be <= \d+|input is too long|input token count .* exceeds the maximum"
    r"|exceeds the context window|context window",
    re.IGNORECASE,
)
CONNECT_TIMEOUT_S = 5.0
# Only connecting is bounded here: the whole call's timeout is the caller's (`worker.providers.bounded`).
CONNECT_ONLY = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
# Entries (object members and array elements) an answer may hold before it is parsed. A chat completion holds a
# few hundred, a list of a thousand models about ten thousand; parsing holds the loop for a time that follows the
# entries, not the bytes (8 MiB of tiny ones took 1.6 s), and an endpoint, a draft's above all, may be hostile.
MAX_RESPONSE_ENTRIES = 50_000
QUOTA_PATTERNS = re.compile(r"insufficient_quota|quota exceeded|billing", re.IGNORECASE)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms` first (Azure), then `retry-after` as seconds or an HTTP date."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    if (value := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def error_text(body: bytes) -> str:
    """The human part of an error body, whatever shape the server used."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _prefix(body)
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            parts = [str(value)[:500] for k in ("code", "type", "message") if (value := error.get(k))]
            return " ".join(parts)[:500] or _prefix(body)
        if isinstance(error, str):
            return error[:500]
    return _prefix(body)  # the text as sent, never a rendering of everything it parsed into


def _prefix(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace").strip() or "(empty body)"


def classify_status(status: int, text: str, headers: Mapping[str, str], who: str) -> ProviderError:
    """Map an HTTP error answer into the taxonomy, with an actionable message."""
    retry_after = retry_after_seconds(headers)
    if CONTEXT_OVERFLOW_PATTERNS.search(text) and status in (400, 413, 422):
        return ProviderError(
            ErrorClass.CONTEXT_OVERFLOW,
            f"{status} from {who}: prompt too long ({text})",
            code="context_overflow",
            status=status,
        )
    if status == 429 and QUOTA_PATTERNS.search(text):
        return ProviderError(
            ErrorClass.QUOTA,
            f"429 from {who}: quota or billing exhausted ({text})",
            code="quota_exceeded",
            status=status,
        )
    if status == 429:
        return ProviderError(
            ErrorClass.RATE_LIMITED,
            f"429 from {who}: rate limited ({text})",
            code="rate_limited",
            retry_after_s=retry_after,
            status=status,
        )
    if status in (408, 409) or status >= 500:
        return ProviderError(
            ErrorClass.TRANSIENT,
            f"{status} from {who}: server error ({text})",
            code="provider_unavailable",
            retry_after_s=retry_after,
            status=status,
        )
    if status == 401:
        return ProviderError(
            ErrorClass.AUTH,
            f"401 from {who}: check the API key or credentials ({text})",
            code="unauthorized",
            status=status,
        )
    if status == 403:
        return ProviderError(
            ErrorClass.AUTH,
            f"403 from {who}: the credentials lack permission, or a network rule blocks the worker ({text})",
            code="forbidden",
            status=status,
        )
    if status == 404:
        return ProviderError(
            ErrorClass.NOT_FOUND,
            f"404 from {who}: check the model or deployment name and the URL ({text})",
            code="not_found",
            status=status,
        )
    return ProviderError(
        ErrorClass.BAD_REQUEST,
        f"{status} from {who}: request rejected ({text})",
        code="bad_request",
        status=status,
    )


def transport_error(exc: BaseException, who: str) -> ProviderError:
    """Connection failures are transient; what the egress policy refused is not. (The call's own timeout is
    applied once, around the whole call, by `worker.providers.bounded`.)"""
    if (refused := egress_error(exc, who)) is not None:
        return refused
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return ProviderError(
            ErrorClass.TRANSIENT, f"{who} did not accept a connection within {CONNECT_TIMEOUT_S:g}s", code="timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProviderError(
            ErrorClass.TRANSIENT, f"cannot connect to {who}: {exc.os_error or exc}", code="unreachable"
        )
    return ProviderError(ErrorClass.TRANSIENT, f"{who} connection failed: {type(exc).__name__}", code="unreachable")


def malformed(who: str, detail: str) -> ProviderError:
    """A 200 whose body we cannot read is the server misbehaving: retryable."""
    return ProviderError(ErrorClass.TRANSIENT, f"{who} returned a malformed body: {detail}", code="malformed_response")


Classifier = Callable[[int, bytes, Mapping[str, str], str], ProviderError]


def classify_body(status: int, payload: bytes, headers: Mapping[str, str], who: str) -> ProviderError:
    """The default classifier: status code plus the error text, whatever the body's shape."""
    return classify_status(status, error_text(payload), headers, who)


def json_object(payload: bytes) -> dict[str, Any]:
    """The body as a JSON object, or {} when it is not one (error bodies are often HTML from a proxy)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def refuse_two_credentials(url: str, headers: Mapping[str, str], who: str) -> None:
    """HTTP carries one Authorization: a `user:password@` URL and an api_key would both claim it (aiohttp
    refuses the request), so the tenant admin is told which two settings conflict instead."""
    if urlsplit(url).username is not None and any(name.lower() == "authorization" for name in headers):
        raise ProviderError(
            ErrorClass.BAD_REQUEST,
            f"{who}: the endpoint has credentials in its URL and an api_key is set too; keep one of them",
            code="config_invalid",
        )


async def send_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    who: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    classify: Classifier = classify_body,
) -> Any:
    """Send a JSON request (or none); return the decoded answer or raise a classified ProviderError."""
    send_headers = {"Accept": "application/json", **(headers or {})}
    refuse_two_credentials(url, send_headers, who)
    data = None
    if body is not None:
        data = orjson.dumps(body)
        send_headers["Content-Type"] = "application/json"
    try:
        async with session.request(
            method, url, data=data, headers=send_headers, timeout=CONNECT_ONLY, allow_redirects=False
        ) as response:
            payload = await response.read()  # read and capped by the session's egress policy
            flooded = await exceeds(payload, MAX_RESPONSE_ENTRIES)
            if response.status >= 400:
                if flooded:  # judged by its status alone
                    unread = f"(error body not read: more than {MAX_RESPONSE_ENTRIES:,} JSON entries)".encode()
                    raise classify(response.status, unread, response.headers, who)
                raise classify(response.status, payload, response.headers, who)
            if flooded:
                raise malformed(who, f"more than {MAX_RESPONSE_ENTRIES:,} JSON entries")
    except ProviderError:
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise transport_error(exc, who) from exc
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise malformed(who, "not JSON") from exc

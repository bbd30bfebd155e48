"""Masks credentials in anything an operator command prints: header values, message bodies, broker URLs.

Dead letters carry incident context (logs, alerts) as the publisher sent it, and logs are where tokens leak,
so output is masked by field name (`api_key`, `password`, `authorization`, …) and by value shape (bearer
tokens, `sk-…` keys, AWS access key ids, JWTs, user:password@ in URLs, `?key=` query parameters)."""

import re
from typing import Any

MASK = "***"
SECRET_FIELD = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[-_]?key|apikey|authorization|credential|private[-_]?key|"
    r"access[-_]?key|cookie|signature",
    re.IGNORECASE,
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE), rf"\1\2{MASK}"),
    (re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_-]{6,}"), rf"\1-{MASK}"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), rf"\1{MASK}"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), MASK),
    (re.compile(r"([a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@", re.IGNORECASE), rf"\1{MASK}@"),
    (
        re.compile(r"([?&](?:api[-_]?key|key|token|access_token|sig|signature|password|secret)=)[^&\s\"']+", re.I),
        rf"\1{MASK}",
    ),
    (
        re.compile(
            r"\b((?:api[-_]?key|password|passwd|secret|token|access[-_]?key|client[-_]?secret)[\"']?\s*[=:]\s*[\"']?)"
            r"[^\s\"',;&]+",
            re.IGNORECASE,
        ),
        rf"\1{MASK}",
    ),
)


def redact_text(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, field: str = "") -> Any:
    """A copy of a JSON-like value with secrets masked. Strings under a secret-looking field name are masked
    whole; counters such as `input_tokens` stay readable because only strings are masked by name."""
    if isinstance(value, dict):
        return {key: redact(item, str(key)) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item, field) for item in value]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if field and SECRET_FIELD.search(field) and value:
            return MASK
        return redact_text(value)
    return value

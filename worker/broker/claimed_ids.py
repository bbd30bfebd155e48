"""The ids a body that is not a valid request claims: for its rejection reply and its dead letter."""

import re

import orjson

# A body refused unread (too large) or not JSON at all is never parsed whole: only this much of its head is read.
HEAD_BYTES = 64 * 1024
MAX_ID_CHARS = 200
# Requests have a dozen top-level members; a head of more scalars than this is not one.
MAX_LEADING_MEMBERS = 32
_IDS = ("request_id", "tenant_id", "task")

_OPEN = re.compile(rb"[ \t\n\r]*\{")
# One top-level member whose value is a string or another scalar, and what follows it. Inside a string the two
# alternatives cannot both match at one position (a backslash pair, or one character that is neither a quote nor
# a backslash), so matching is linear; both lengths are bounded, so a member too long to hold an id ends the scan.
_MEMBER = re.compile(
    rb'[ \t\n\r]*("(?:[^"\\]|\\.){1,64}")[ \t\n\r]*:[ \t\n\r]*'
    rb'("(?:[^"\\]|\\.){0,1024}"|[-+.0-9a-zA-Z]{1,32})[ \t\n\r]*([,}])'
)

Ids = tuple[str | None, str | None, str | None]


def parsed_ids(body: bytes) -> Ids:
    """`request_id`, `tenant_id` and `task` of a JSON object that did not validate as a request, each a string cut
    to 200 characters or None."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return leading_ids(body)
    if not isinstance(data, dict):
        return None, None, None
    return _text(data.get("request_id")), _text(data.get("tenant_id")), _text(data.get("task"))


def leading_ids(body: bytes) -> Ids:
    """The same ids, read from the string members that lead the body's first 64 KiB, as the request contract and
    its example order them, up to the first member that is not a scalar: without parsing the rest, which may be
    too large to read or not JSON at all."""
    end = min(len(body), HEAD_BYTES)
    opened = _OPEN.match(body, 0, end)
    if opened is None:
        return None, None, None
    found: dict[str, str | None] = {}
    position = opened.end()
    for _ in range(MAX_LEADING_MEMBERS):
        member = _MEMBER.match(body, position, end)
        if member is None:
            break
        key, value, after = member.groups()
        name = _decoded(key)
        if name in _IDS:
            found[name] = _text(_decoded(value)) if value.startswith(b'"') else None  # the last one counts, as parsed
        if after == b"}":
            break
        position = member.end()
    return found.get("request_id"), found.get("tenant_id"), found.get("task")


def _decoded(token: bytes) -> object:
    try:
        return orjson.loads(token)
    except orjson.JSONDecodeError:  # a bad escape, a lone surrogate, a control character: not an id
        return None


def _text(value: object) -> str | None:
    return value[:MAX_ID_CHARS] if isinstance(value, str) else None

"""Byte and integer bounds on what the worker reads from a delivery and republishes to the broker."""

import re
from collections.abc import Mapping
from typing import Any, Final

from pamqp.encode import field_table

from contracts import Header

# A request body is read only up to this; a bigger one is dead-lettered as a prefix (`--max-body-bytes`).
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
# Entries (object members and array elements) a request body may hold (`--max-body-entries`). Validation holds
# the GIL, so no thread can take it off the event loop, and its time follows the entries, not the bytes: 4 MiB of
# tiny alerts is 680,000 entries and takes 0.6-1.5 s. At this bound the worst body takes about 50-100 ms, valid or
# not (each collection stops at its first bad item, but what comes before it is parsed and validated).
MAX_BODY_ENTRIES: Final = 100_000
# What a dead letter keeps of a body over the limit: enough to see what it was, never the whole thing.
DEAD_LETTER_BODY_PREFIX_BYTES: Final = 64 * 1024
# RabbitMQ's default frame_max. All of a message's properties travel in one content-header frame, and a
# frame over the limit makes the broker close the whole connection, not just the channel.
FRAME_MAX_BYTES: Final = 131_072
# The encoded header table of any copy the worker publishes stays under this. The rest of the frame holds
# the fixed content-header fields and at most nine short-string properties of 255 bytes each (< 3 KiB).
HEADER_BUDGET_BYTES: Final = 96 * 1024
# Counts read from headers (attempts, deferrals, replays) are clamped here, far inside AMQP's int64,
# so a count plus one can always be written back.
MAX_COUNT: Final = 1_000_000
_TABLE_LENGTH_BYTES: Final = 4
# Error text the worker writes into a copy's headers is cut to this many characters.
ERROR_MESSAGE_LIMIT: Final = 1000
# The longest value the worker writes under one of its own short headers (timestamps, exchange and routing-key
# names, which AMQP caps at 255 bytes, tenant ids, codes and kinds).
SHORT_HEADER_CHARS: Final = 255


def encoded_size(name: str, value: Any) -> int | None:
    """Bytes `name: value` takes in an AMQP field table, or None when it cannot be encoded (an integer
    outside int64, a name over 255 bytes, a type AMQP has no field for)."""
    try:
        return len(field_table({name: value})) - _TABLE_LENGTH_BYTES
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return None


def bounded_headers(publisher: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """`ours` in full plus as many of the publisher's headers as fit the budget, in their order. Publisher
    headers that cannot be re-encoded or do not fit are left off, and `atlas-headers-dropped` says how many."""

    used = _TABLE_LENGTH_BYTES + sum(encoded_size(k, v) or 0 for k, v in ours.items())
    used += encoded_size(Header.HEADERS_DROPPED, MAX_COUNT) or 0  # room to say we dropped some
    kept: dict[str, Any] = {}
    dropped = 0
    for name, value in publisher.items():
        if name in ours:
            continue
        size = encoded_size(name, value)
        if size is None or used + size > HEADER_BUDGET_BYTES:
            dropped += 1
            continue
        kept[name] = value
        used += size
    headers = {**kept, **ours}
    if dropped:
        headers[Header.HEADERS_DROPPED] = dropped
    return headers


def bounded_body(body: bytes, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The body to republish and the headers that say it was cut: a body over `limit` keeps a prefix."""

    if len(body) <= max(limit, DEAD_LETTER_BODY_PREFIX_BYTES):  # within the limit, or as short as a prefix
        return body, {}
    return body[:DEAD_LETTER_BODY_PREFIX_BYTES], {Header.BODY_TRUNCATED: True, Header.ORIGINAL_BODY_BYTES: len(body)}


# The scan below reads at most this many bytes per regex call: a call holds the GIL, and a thread that holds it
# for long (one 4 MiB string read in one call) stalls the event loop as surely as running on it would.
SCAN_WINDOW_BYTES: Final = 64 * 1024
_TO_STRUCTURE: Final = re.compile(rb'[^"{\[,]*+([{\[,"])')  # to the next entry or string, outside strings
_IN_STRING: Final = re.compile(rb"(?:[^\"\\]++|\\.)*+", re.DOTALL)  # up to a closing quote, escapes skipped
_QUOTE: Final = ord('"')
_NOT_STRUCTURAL: Final = bytes(set(range(256)) - set(b"{[,"))


def entries_may_exceed(body: bytes, limit: int) -> bool:
    """False when `body` cannot hold more than `limit` entries: it has no more braces, brackets and commas,
    wherever they are. One pass, cheap enough for every delivery, and exact enough for nearly all of them."""
    return len(body) > limit and len(body.translate(None, _NOT_STRUCTURAL)) > limit


def count_entries(body: bytes, stop_after: int, window: int = SCAN_WINDOW_BYTES) -> int:
    """The entries in JSON `body` (object members plus array elements; an empty object or array counts as one),
    counting no further than `stop_after` + 1, which it also returns for a body with more strings than that many
    entries can hold (two per member and one more), valid JSON or not. Linear in the body's length, with one
    Python step per entry, string and window, and at most `window` bytes read per regex call: on a thread, the
    event loop gets the GIL back within a switch interval."""
    if window < 2:  # a window must hold a backslash and what it escapes
        raise ValueError(f"window is {window} bytes; it must be at least 2")
    entries = strings = position = 0
    end = len(body)
    while position < end and entries <= stop_after:
        found = _TO_STRUCTURE.match(body, position, position + window)
        if found is None:  # none in this window
            position += window
            continue
        position = found.end()
        if found[1] != b'"':
            entries += 1
            continue
        strings += 1
        if strings > 2 * stop_after + 1:
            return stop_after + 1
        while position < end:  # to the string's closing quote, a window at a time
            limit = min(position + window, end)
            part = _IN_STRING.match(body, position, limit)  # matches always, if only nothing
            stop = part.end() if part else position
            if stop < limit and body[stop] == _QUOTE:
                position = stop + 1
                break
            if stop == position:  # a backslash with nothing after it: the body ends inside this string
                return entries
            position = stop  # the window ended, perhaps between a backslash and what it escapes
    return entries

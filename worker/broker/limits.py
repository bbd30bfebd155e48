"""Byte and integer bounds on what the worker reads from a delivery and republishes to the broker."""

from collections.abc import Mapping
from typing import Any, Final

from pamqp.encode import field_table

from contracts import Header

# A request body is read only up to this; a bigger one is dead-lettered as a prefix (`--max-body-bytes`).
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
# Entries (object members and array elements) a request body may hold (`--max-body-entries`). Validation holds
# the GIL, so no thread can take it off the event loop, and its time follows the entries, not the bytes: 4 MiB of
# tiny alerts is 680,000 entries and takes 0.6-1.5 s. At this bound the worst body takes about 50-140 ms, valid or
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

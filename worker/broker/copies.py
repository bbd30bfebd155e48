"""Message copies: a delivery republished (retry, deferral, reroute, dead letter, replay) with new headers."""

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

from contracts import Header
from worker.broker.headers import Headers, read_count
from worker.broker.limits import bounded_body
from worker.broker.publish import PERSISTENT, Properties
from worker.redaction import redact_body, redact_cut_body

ATLAS_PREFIX: Final = "atlas-"
MASK_ON_LOOP_BYTES: Final = 64 * 1024  # a dead letter's body bigger than this is masked on a thread
# Informational headers `dlq replay` writes; they change nothing the worker does, so they travel on.
PASSED_ON: Final = frozenset({Header.REPLAYS, Header.REPLAYED_AT})
# Headers that describe a past failure: a replayed request starts clean (attempts too, unless kept).
FAILURE_HEADERS: Final = frozenset(
    {
        Header.REASON,
        Header.ERROR_CODE,
        Header.ERROR_CLASS,
        Header.ERROR_MESSAGE,
        Header.FIRST_FAILURE_AT,
        Header.LAST_FAILURE_AT,
        Header.DEAD_LETTERED_AT,
        Header.ORIGINAL_EXCHANGE,
        Header.ORIGINAL_ROUTING_KEY,
        Header.RETRY_LEVEL,
        Header.PROVIDER_KIND,
        Header.CIRCUIT_WAITS,
        Header.LAST_PROVIDER_ERROR_CODE,
        Header.LAST_PROVIDER_ERROR_MESSAGE,
        Header.DEFERRALS,
        Header.DEAD_LETTER_ID,
        Header.HEADERS_DROPPED,
        Header.BODY_TRUNCATED,
        Header.ORIGINAL_BODY_BYTES,
        Header.HISTORY,
    }
)


def _copied(message: AbstractIncomingMessage, user_id: str | None) -> dict[str, Any]:
    """The original's properties every copy keeps, by aio-pika's names (headers and delivery mode are the copy's).
    `user_id` is the publishing connection's own user, never the original's: the broker refuses any other, and
    with publisher rules on it is how the worker knows its own copies when they come back."""
    return {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "correlation_id": message.correlation_id,
        "reply_to": message.reply_to,
        "message_id": message.message_id,
        "timestamp": message.timestamp,
        "type": message.type,
        "user_id": user_id,
        "app_id": message.app_id,
        "priority": message.priority,
    }


def copy_of(
    message: AbstractIncomingMessage, body: bytes, headers: dict[str, Any], *, user_id: str | None
) -> aio_pika.Message:
    """A persistent copy of `message` with `body` and `headers`, published as `user_id`: every other property is
    the original's (`dlq replay` publishes it through aio-pika; `copy_properties` is the same copy for `settle`)."""
    return aio_pika.Message(body, headers=headers, delivery_mode=DeliveryMode.PERSISTENT, **_copied(message, user_id))


def copy_properties(message: AbstractIncomingMessage, headers: dict[str, Any], *, user_id: str | None) -> Properties:
    """The properties of `copy_of`, built straight for the channel (see `worker.broker.publish`)."""
    copied = _copied(message, user_id)
    copied["message_type"] = copied.pop("type")  # pamqp's name for it
    return Properties(headers=headers, delivery_mode=PERSISTENT, **copied)


async def copy_body(body: bytes, limit: int, *, dead_letter: bool) -> tuple[bytes, dict[str, Any]]:
    """The body a copy carries and the headers that say how it differs from the original: cut to a prefix
    when over `limit`, and for a dead letter (read by operators, kept for days) its secrets masked.

    A body over the limit is cut before anything reads it (it can be as large as the broker allows), and its
    prefix, which can be neither parsed nor replayed, is masked as text. A whole body is masked as JSON, which
    takes time in proportion to its items (seconds for 4 MiB of them): a large one is masked off the loop."""
    body, cut = bounded_body(body, limit)
    if not dead_letter:
        return body, cut
    if cut:
        masked: bytes | None = redact_cut_body(body)
    elif len(body) > MASK_ON_LOOP_BYTES:
        masked = await asyncio.to_thread(redact_body, body)
    else:
        masked = redact_body(body)
    return (body, cut) if masked is None else (masked, cut | {Header.REDACTED: True})


# Headers the broker reads as more routing keys ("sender-selected distribution"): on a copy the worker publishes,
# they would send it to queues the worker never chose (another tenant's Atlas Cloud queue, every retry level).
# RabbitMQ matches `CC` and `BCC` exactly; every spelling is dropped, so no broker's reading is left to chance.
ROUTING_HEADERS = frozenset({"cc", "bcc"})


def publisher_headers(headers: Headers) -> dict[str, Any]:
    """The publisher's own headers. `atlas-` names are the worker's: those it vouches for come back through
    `HeaderTrust.believed`, and the rest a publisher may have forged, so they are not passed on; nor are the
    headers the broker would route the copy by."""
    return {
        k: v
        for k, v in (headers or {}).items()
        if (not k.startswith(ATLAS_PREFIX) or k in PASSED_ON) and k.lower() not in ROUTING_HEADERS
    }


def lineage_headers(delivery: AbstractIncomingMessage, believed: Headers, *, put_back: bool) -> dict[str, int]:
    """Where this copy stands in the request's history (README, delivery guarantees): `settle_seq` grows
    each time a worker puts the request back on the ladder, `redeliveries` each time the broker redelivered
    it. A redelivered original whose earlier run already put a copy back thus ranks below that copy."""
    return {
        Header.SETTLE_SEQ: read_count(believed, Header.SETTLE_SEQ) + put_back,
        Header.REDELIVERIES: read_count(believed, Header.REDELIVERIES) + bool(delivery.redelivered),
    }


def replay_headers(headers: Mapping[str, Any], *, keep_attempts: bool) -> dict[str, Any]:
    """The headers a replayed request carries: the publisher's own but those the broker routes by, none of the
    failure history (the broker's `x-` headers included), attempts only if asked, and when it was replayed."""
    kept = {
        k: v
        for k, v in headers.items()
        if not k.startswith("x-") and k not in FAILURE_HEADERS and k.lower() not in ROUTING_HEADERS
    }
    if not keep_attempts:
        kept.pop(Header.ATTEMPTS, None)
    kept[Header.REPLAYS] = read_count(headers, Header.REPLAYS) + 1
    kept[Header.REPLAYED_AT] = datetime.now(UTC).isoformat()
    # A replay is a new step of the request's history: its reply must outrank the dead letter's.
    kept[Header.SETTLE_SEQ] = read_count(headers, Header.SETTLE_SEQ) + 1
    return kept

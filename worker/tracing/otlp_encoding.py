"""OTLP/HTTP span export whose protobuf is written directly, at a fraction of the reference encoder's CPU."""

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import structlog

if TYPE_CHECKING:  # the otel extra is optional: these are only imported once tracing is switched on
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status

log = structlog.get_logger("worker.tracing.otlp_encoding")

# Wire types of the protobuf encoding.
VARINT: Final = 0
FIXED64: Final = 1
LENGTH: Final = 2
FIXED32: Final = 5
# Span flags: the parent's "is remote" bit is known, and whether it is set (trace.proto's SpanFlags).
HAS_IS_REMOTE: Final = 0x100
IS_REMOTE: Final = 0x200
UINT64: Final = (1 << 64) - 1

_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack


_SMALL: Final = tuple(bytes((n,)) for n in range(0x80))  # one-byte varints, looked up rather than built


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _field(field: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or a nested message)."""
    return _tag(field, LENGTH) + _varint(len(payload)) + payload


def _string(field: int, text: str) -> bytes:
    return _field(field, text.encode("utf-8", "surrogatepass")) if text else b""


def _any_value(value: Any) -> bytes:
    """An AnyValue message (common.proto), for the value types attributes may hold."""
    if type(value) is str:  # by far the most common: tested first, exactly
        encoded = value.encode("utf-8", "surrogatepass")
        return b"\x0a" + _varint(len(encoded)) + encoded
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _any_value(str(value))
    if isinstance(value, int):
        return b"\x18" + _varint(value & UINT64)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return b"\x3a" + _varint(len(value)) + value
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(6, _key_values(1, value))
    return b""  # None, or a type no attribute may hold: an empty AnyValue, as the reference encoder writes


_KEYS: dict[str, bytes] = {}  # attribute names are a small closed set: each one's encoding is made once
KEY_CACHE_LIMIT: Final = 1024
# Most attribute values come from small sets too (system, operation, destination, provider, model, task, attempt):
# a key's encoded pairs are kept until it shows more than VALUES_PER_KEY distinct values (a request id). Only str,
# int and tuple-of-str values are kept (True == 1 and 1.0 == 1 as dict keys, but each encodes differently).
_PAIRS: dict[str, dict[str | int | tuple[str, ...], bytes] | None] = {}
VALUES_PER_KEY: Final = 32
CACHED_VALUE_CHARS: Final = 200


def _key(key: str) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        encoded = _string(1, str(key))
        if len(_KEYS) < KEY_CACHE_LIMIT:
            _KEYS[key] = encoded
    return encoded


def _pair(key: str, value: Any) -> bytes:
    """A KeyValue message with its length in front."""
    if type(value) is str:  # inlined: most values are strings
        text = value.encode("utf-8", "surrogatepass")
        size = len(text)
        encoded_value = (b"\x0a" + _SMALL[size] if size < 0x80 else b"\x0a" + _varint(size)) + text
    else:
        encoded_value = _any_value(value)
    size = len(encoded_value)
    pair = _key(key) + b"\x12" + (_SMALL[size] if size < 0x80 else _varint(size)) + encoded_value
    size = len(pair)
    return (_SMALL[size] if size < 0x80 else _varint(size)) + pair


def _new_pair(key: str, value: Any) -> bytes:
    """A pair not found among the kept ones: encoded, and kept if its key and value qualify."""
    pair = _pair(key, value)
    kind = type(value)
    if (
        (kind is str and len(value) <= CACHED_VALUE_CHARS)
        or kind is int
        or (kind is tuple and len(value) <= 4 and all(type(v) is str and len(v) <= CACHED_VALUE_CHARS for v in value))
    ):
        seen = _PAIRS.get(key, {})
        if seen is not None:
            if len(seen) >= VALUES_PER_KEY:
                _PAIRS[key] = None  # too many distinct values to be worth keeping
            elif key in _PAIRS or len(_PAIRS) < KEY_CACHE_LIMIT:
                seen[value] = pair
                _PAIRS[key] = seen
    return pair


def _pairs(attributes: Mapping[str, Any]) -> list[bytes]:
    """Each attribute as a KeyValue message with its length in front (one loop: a call per attribute costs)."""
    out = []
    for key, value in attributes.items():
        kind = type(value)
        if kind is str or kind is int or kind is tuple:
            seen = _PAIRS.get(key)
            if seen is not None:
                pair = seen.get(value)
                if pair is not None:
                    out.append(pair)
                    continue
        out.append(_new_pair(key, value))
    return out


def _key_values(field: int, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue messages under `field`."""
    if not attributes:
        return b""
    tag = _tag(field, LENGTH)
    # The SDK's BoundedAttributes iterates through MutableMapping's generic, slow items(); its dict does not.
    plain = getattr(attributes, "_dict", attributes)
    return tag + tag.join(_pairs(plain if isinstance(plain, dict) else attributes))


def _remote_flags(context: "SpanContext | None") -> bytes:
    return _fixed32(HAS_IS_REMOTE | IS_REMOTE if context is not None and context.is_remote else HAS_IS_REMOTE)


def _trace_state(context: "SpanContext") -> bytes:
    state = context.trace_state
    return _string(3, ",".join(f"{k}={v}" for k, v in state.items())) if state else b""


def _uint(field: int, value: int) -> bytes:
    return _tag(field, VARINT) + _varint(value) if value else b""


def encode_span(span: "ReadableSpan") -> bytes:
    """One Span message (trace.proto)."""
    context = span.get_span_context()
    if context is None:  # only a span that was never started lacks a context; the SDK exports none such
        return b""
    parent = span.parent
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        _trace_state(context),
        b"\x22\x08" + parent.span_id.to_bytes(8, "big") if parent is not None else b"",
        _string(5, span.name),
        b"\x30" + _varint(span.kind.value + 1),  # the API's kinds start at internal = 0, OTLP's at unspecified
        b"\x39" + _fixed64(span.start_time or 0),
        b"\x41" + _fixed64(span.end_time or 0),
        _key_values(9, span.attributes),
        _uint(10, span.dropped_attributes),
    ]
    for event in span.events:
        body = b"\x09" + _fixed64(event.timestamp) + _string(2, event.name) + _key_values(3, event.attributes)
        parts.append(_field(11, body + _uint(4, event.dropped_attributes)))
    parts.append(_uint(12, span.dropped_events))
    for link in span.links:
        parts.append(_link(link))
    parts.append(_uint(14, span.dropped_links))
    status = span.status
    parts.append(_field(15, _string(2, status.description or "") + _uint(3, status.status_code.value)))
    parts.append(b"\x85\x01" + _remote_flags(parent))  # field 16, fixed32
    return b"".join(parts)


def encode_ended(
    context: "SpanContext",
    parent: "SpanContext | None",
    name: str,
    kind: "SpanKind",
    start_time: int,
    end_time: int,
    attributes: Mapping[str, Any],
    events: Sequence[tuple[str, Mapping[str, Any], int]],
    links: Sequence["Link"],
    status: "Status",
) -> bytes:
    """One Span message from a span's plain values, as `worker.tracing.spans.LightSpan` keeps them (nothing dropped)."""
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big") + b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        _trace_state(context),
        b"\x22\x08" + parent.span_id.to_bytes(8, "big") if parent is not None else b"",
        _name(name),
        _KINDS[kind._value_],  # an Enum's value attribute: `.value` is a descriptor call
        b"\x39" + _fixed64(start_time) + b"\x41" + _fixed64(end_time),
        b"\x4a" + b"\x4a".join(_pairs(attributes)) if attributes else b"",  # field 9
    ]
    for event_name, event_attributes, timestamp in events:
        body = b"\x09" + _fixed64(timestamp) + _string(2, event_name) + _key_values(3, event_attributes)
        parts.append(_field(11, body))
    for link in links:
        parts.append(_link(link))
    if status.status_code._value_ == 0 and not status.description:
        parts.append(_UNSET_STATUS)
    else:
        parts.append(_field(15, _string(2, status.description or "") + _uint(3, status.status_code.value)))
    parts.append(_REMOTE_PARENT if parent is not None and parent.is_remote else _LOCAL_PARENT)
    return b"".join(parts)


_KINDS: Final = tuple(b"\x30" + _varint(kind + 1) for kind in range(5))  # the API's kinds, internal = 0 … consumer
_UNSET_STATUS: Final = _field(15, b"")
_LOCAL_PARENT: Final = b"\x85\x01" + _fixed32(HAS_IS_REMOTE)
_REMOTE_PARENT: Final = b"\x85\x01" + _fixed32(HAS_IS_REMOTE | IS_REMOTE)
_NAMES: dict[str, bytes] = {}  # span names: one per queue, model and step


def _name(name: str) -> bytes:
    encoded = _NAMES.get(name)
    if encoded is None:
        encoded = _string(5, name)
        if len(_NAMES) < KEY_CACHE_LIMIT:
            _NAMES[name] = encoded
    return encoded


def _link(link: "Link") -> bytes:
    linked = link.context
    body = b"\x0a\x10" + linked.trace_id.to_bytes(16, "big") + b"\x12\x08" + linked.span_id.to_bytes(8, "big")
    body += _key_values(4, link.attributes) + _uint(5, link.dropped_attributes)
    return _field(13, body + b"\x35" + _remote_flags(linked))


def _scope(scope: "InstrumentationScope | None") -> bytes:
    if scope is None:
        return _field(1, b"")
    body = _string(1, scope.name) + _string(2, scope.version or "") + _key_values(3, scope.attributes)
    return _field(1, body)


Group = tuple["Resource", "InstrumentationScope | None", Sequence[bytes]]


def encode_request(groups: Iterable[Group]) -> bytes:
    """An ExportTraceServiceRequest (trace_service.proto) of encoded spans, each group of one resource and scope."""
    by_resource: dict[int, tuple[Resource, list[bytes]]] = {}
    for resource, scope, encoded in groups:
        # Keyed by identity: hashing a Resource serialises its attributes to JSON, every time.
        entry = by_resource.setdefault(id(resource), (resource, []))
        scope_spans = _scope(scope) + b"".join(_field(2, s) for s in encoded)
        entry[1].append(_field(2, scope_spans + _string(3, (scope.schema_url if scope else "") or "")))
    out = []
    for resource, scopes in by_resource.values():
        body = _field(1, _key_values(1, resource.attributes)) + b"".join(scopes)
        out.append(_field(1, body + _string(3, resource.schema_url)))
    return b"".join(out)


def encode_spans(spans: Sequence["ReadableSpan"]) -> bytes:
    """An ExportTraceServiceRequest of SDK spans."""
    grouped: dict[int, dict[InstrumentationScope | None, list[bytes]]] = {}
    resources: dict[int, Resource] = {}
    for span in spans:
        resources[id(span.resource)] = span.resource
        by_scope = grouped.setdefault(id(span.resource), {})
        by_scope.setdefault(span.instrumentation_scope or None, []).append(encode_span(span))
    return encode_request((resources[key], s, e) for key, by_scope in grouped.items() for s, e in by_scope.items())


def otlp_span_exporter() -> "SpanExporter":
    """The SDK's OTLP/HTTP exporter (endpoint, headers, compression, timeout and TLS from OTEL_*), sending
    requests encoded by `encode_spans`."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class DirectlyEncodedOTLPSpanExporter(OTLPSpanExporter):
        def export(self, spans: Sequence["ReadableSpan"]) -> SpanExportResult:
            client = getattr(self, "_client", None)
            if getattr(self, "_shutdown", True) or not callable(getattr(client, "export", None)):
                return super().export(spans)  # an SDK whose internals moved: its own (slower) encoding
            try:
                data = encode_spans(spans)
            except Exception as error:  # an attribute no encoder can write must not stop the export thread
                log.error("tracing_encode_failed", error=repr(error), spans=len(spans))
                return SpanExportResult.FAILURE
            limit = getattr(self, "_max_request_size", None)
            if isinstance(limit, int) and 0 < limit < len(data):  # 0 or less: no limit, as in the SDK
                log.warning("tracing_batch_too_large", size=len(data), max_request_size=limit, spans=len(spans))
                return SpanExportResult.FAILURE
            sent = client.export(data)  # type: ignore[union-attr]
            return SpanExportResult.SUCCESS if getattr(sent, "success", False) else SpanExportResult.FAILURE

    return DirectlyEncodedOTLPSpanExporter()

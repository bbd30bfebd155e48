"""W3C trace context headers read into a SpanContext and written from one, by the rules of the SDK's propagator."""

import re
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, TraceFlags, TraceState

HEADER_LIMIT: Final = 512  # a valid traceparent is 55 characters, a tracestate at most 512
# The propagator's own pattern (opentelemetry.trace.propagation.tracecontext), so both accept the same headers.
TRACEPARENT: Final = re.compile(
    "^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})" + "(?:(-.*)|[ \t]*)$"
)
_FLAGS: Final = tuple(TraceFlags(n) for n in range(256))


def header(headers: Mapping[str, Any], key: str) -> str | None:
    """A publisher's non-text or oversized value is ignored, never an error."""
    value = headers.get(key)
    return value if isinstance(value, str) and len(value) <= HEADER_LIMIT else None


def remote_parent(headers: Mapping[str, Any]) -> SpanContext | None:
    """The publisher's span from `traceparent` and `tracestate`, or None where there is no valid one: what
    `TraceContextTextMapPropagator.extract` finds, without building a Context around it."""
    traceparent = header(headers, "traceparent")
    if not traceparent:
        return None
    match = TRACEPARENT.search(traceparent)
    if not match:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16 or version == "ff" or (version == "00" and rest):
        return None
    state = header(headers, "tracestate")
    return SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=_FLAGS[int(flags, 16)],
        trace_state=TraceState.from_header([state]) if state is not None else None,
    )


def write(context: SpanContext, headers: MutableMapping[str, Any]) -> None:
    """`traceparent` (and `tracestate` when it has members) for `context`, as the propagator's inject writes them."""
    if context == INVALID_SPAN_CONTEXT:
        return
    headers["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()

"""The light tracer's shortcuts decide as the SDK does: trace headers, fixed sampler decisions, the current span."""

import secrets
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker.log import configure_logging
from worker.tracing import w3c
from worker.tracing.current_span import attach, current_span, detach
from worker.tracing.spans import LightTracer, fixed_decisions

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": f"00-{TRACE}-{SPAN}-01"},
        {"traceparent": f"00-{TRACE}-{SPAN}-00", "tracestate": "up=1,vendor=x"},
        {"traceparent": f"  00-{TRACE}-{SPAN}-01\t"},
        {"traceparent": f"01-{TRACE}-{SPAN}-01-future"},  # a later version may append fields
        {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},  # version 00 may not
        {"traceparent": f"ff-{TRACE}-{SPAN}-01"},
        {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},
        {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
        {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
        {"traceparent": f"00-{TRACE}-{SPAN}-0x"},
        {"traceparent": ""},
        {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "not a member"},
        {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": ""},
        {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "a=" + "b" * 600},  # over the limit: dropped
        {"traceparent": b"00-not-text", "tracestate": 7},
        {"traceparent": f"00-{TRACE}-{SPAN}-01" + " " * 600},
    ],
)
def test_trace_headers_are_read_as_the_propagator_reads_them(headers: dict[str, Any]) -> None:
    class AmqpHeaders(Getter[dict[str, Any]]):
        def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
            value = carrier.get(key)
            return [value] if isinstance(value, str) and len(value) <= w3c.HEADER_LIMIT else None

        def keys(self, carrier: dict[str, Any]) -> list[str]:
            return list(carrier)

    extracted = trace.get_current_span(TraceContextTextMapPropagator().extract(headers, getter=AmqpHeaders()))
    expected = extracted.get_span_context()
    parsed = w3c.remote_parent(headers)
    assert (parsed or trace.INVALID_SPAN_CONTEXT) == expected
    if parsed is not None:
        assert parsed.trace_state.to_header() == expected.trace_state.to_header()


@pytest.mark.parametrize("state", ["", "up=1,vendor=x"])
def test_trace_headers_are_written_as_the_propagator_injects_them(state: str) -> None:
    context = SpanContext(
        secrets.randbits(128), secrets.randbits(64), False, TraceFlags(1), TraceState.from_header([state])
    )
    expected: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(expected, trace.set_span_in_context(NonRecordingSpan(context)))
    written: dict[str, str] = {}
    w3c.write(context, written)
    assert written == expected
    nothing: dict[str, str] = {}
    w3c.write(trace.INVALID_SPAN_CONTEXT, nothing)
    assert nothing == {}


PARENTS = [
    None,
    *(
        SpanContext(secrets.randbits(128), secrets.randbits(64), remote, TraceFlags(flags))
        for remote in (False, True)
        for flags in (0, 1, 3)
    ),
]


@pytest.mark.parametrize(
    "sampler",
    [ALWAYS_ON, ALWAYS_OFF, DEFAULT_ON, DEFAULT_OFF, ParentBasedTraceIdRatio(0.5), TraceIdRatioBased(0.5)],
    ids=lambda s: s.get_description(),
)
def test_fixed_decisions_are_what_the_sampler_decides(sampler: Sampler) -> None:
    at_root, by_parent = fixed_decisions(sampler)
    for parent in PARENTS:
        context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else Context()
        decided = sampler.should_sample(context, parent.trace_id if parent else 1, "s").decision
        fixed = (
            at_root if parent is None else (by_parent[parent.is_remote][parent.trace_flags & 1] if by_parent else None)
        )
        assert fixed in (None, decided)
    # Only a trace-id ratio is ever asked: for the root span, and, alone, for every span.
    assert (at_root is None) == isinstance(sampler, TraceIdRatioBased | ParentBasedTraceIdRatio)
    assert (by_parent is None) == (type(sampler) is TraceIdRatioBased)


def test_a_parent_based_sampler_with_its_own_delegates_is_always_asked() -> None:
    assert fixed_decisions(ParentBased(ALWAYS_ON, remote_parent_sampled=TraceIdRatioBased(0.1))) == (None, None)


def test_light_spans_follow_the_sampler_and_the_current_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=DEFAULT_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = LightTracer(provider, "t")
    unsampled = SpanContext(secrets.randbits(128), secrets.randbits(64), True, TraceFlags(0))
    assert not tracer.start_child("dropped", unsampled).is_recording()  # the remote parent was not sampled
    with tracer.start_as_current_span("outer") as outer:
        assert current_span() is outer is trace.get_current_span()
        tracer.start_span("inner").end()
    assert current_span() is trace.INVALID_SPAN
    inner, finished = exporter.get_finished_spans()
    assert inner.parent == finished.context


def test_current_span_helpers_agree_with_the_api() -> None:
    span = NonRecordingSpan(SpanContext(1, 2, False))
    token = attach(span)
    try:
        assert trace.get_current_span() is span is current_span()
    finally:
        detach(token)
    assert trace.get_current_span() is trace.INVALID_SPAN is current_span()


def test_a_publishers_malformed_tracestate_cannot_flood_the_log(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("info", cache=False)  # the worker's own pipeline, writing to the captured stderr
    members = ",".join(f"bad key {n}=v" for n in range(40))[: w3c.HEADER_LIMIT]  # each member warns in the SDK
    parent = w3c.remote_parent({"traceparent": f"00-{'1' * 32}-{'2' * 16}-01", "tracestate": members})

    assert parent is not None
    assert parent.trace_id == int("1" * 32, 16)
    assert capsys.readouterr().err == ""  # not one line quoting the publisher's text

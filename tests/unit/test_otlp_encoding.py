"""The direct OTLP encoder writes the same ExportTraceServiceRequest as the OpenTelemetry reference encoder."""

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as reference_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.util.types import AttributeValue

from worker.tracing.otlp_config import BatchLimits, OtlpTarget
from worker.tracing.otlp_encoding import encode_request, encode_spans
from worker.tracing.otlp_export import LoopSpanExport, _grouped
from worker.tracing.spans import LightSpan, LightTracer


def recorded_spans() -> tuple[ReadableSpan, ...]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "w", "host.cores": 2}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("up", "1"), ("vendor", "x")]),
    )
    tracer = provider.get_tracer("atlas-inference-worker", "1.2.3", schema_url="https://opentelemetry.io/schemas/1.30")
    other = provider.get_tracer("other")
    attributes: dict[str, AttributeValue] = {
        "text": "value é 😀",
        "empty": "",
        "flag": True,
        "off": False,
        "count": 3,
        "zero": 0,
        "negative": -5,
        "big": 2**62,
        "ratio": 0.25,
        "reasons": ("stop", "length"),
        "numbers": [1, 2],
    }
    with tracer.start_as_current_span(
        "process q",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=[Link(remote, {"atlas.link": "earlier_delivery"})],
    ) as consumer:
        consumer.add_event("publish", {"messaging.destination.name": "replies"})
        consumer.add_event("bare")
        with tracer.start_as_current_span("chat m", kind=SpanKind.CLIENT) as model:
            model.set_status(Status(StatusCode.ERROR, "timed out"))
        other.start_span("fallback_policy", attributes={"error.type": "timeout"}).end()
    return exporter.get_finished_spans()


def test_the_encoding_decodes_to_what_the_reference_encoder_makes() -> None:
    spans = recorded_spans()
    decoded = ExportTraceServiceRequest.FromString(encode_spans(spans))
    assert decoded == reference_encode(spans)
    [resource_spans] = decoded.resource_spans
    assert {scope.scope.name for scope in resource_spans.scope_spans} == {"atlas-inference-worker", "other"}
    assert sum(len(scope.spans) for scope in resource_spans.scope_spans) == 3


def test_an_empty_batch_is_an_empty_request() -> None:
    assert encode_spans(()) == b""


def test_light_spans_encode_as_the_reference_encodes_the_same_spans() -> None:
    ended: list[tuple[LightSpan, int]] = []

    class Capture(LoopSpanExport):
        def on_end_light(self, span: LightSpan, end_time: int, resource: Resource, scope: InstrumentationScope) -> None:
            ended.append((span, end_time))
            super().on_end_light(span, end_time, resource, scope)

    export = Capture(OtlpTarget(), BatchLimits())
    provider = TracerProvider(resource=Resource.create({"service.name": "w"}))
    provider.add_span_processor(export)
    tracer = LightTracer(provider, "atlas-inference-worker")
    [original] = [s for s in recorded_spans() if s.name == "process q"]  # its remote parent, trace state, link
    assert original.parent is not None
    with tracer.start_as_current_span(
        "process q",
        context=set_span_in_context(NonRecordingSpan(original.parent)),
        kind=SpanKind.CONSUMER,
        attributes=dict(original.attributes or {}),
        links=original.links,
    ) as consumer:
        consumer.add_event("publish", {"messaging.destination.name": "replies"})
        chat = tracer.start_span("chat m", kind=SpanKind.CLIENT, attributes={"gen_ai.usage.input_tokens": 612})
        chat.set_status(Status(StatusCode.ERROR, "timed out"))
        chat.end()
        tracer.start_span("settle").end()

    readable = [
        ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=provider.resource,
            attributes=span.attributes,
            events=[Event(name, attributes, timestamp) for name, attributes, timestamp in span.events],
            links=span.links,
            kind=span.kind,
            status=span.status,
            start_time=span.start_time,
            end_time=end_time,
            instrumentation_scope=tracer._scope,
        )
        for span, end_time in ended
    ]
    direct = encode_request(_grouped(export._queue))
    assert ExportTraceServiceRequest.FromString(direct) == reference_encode(readable)
    assert len(ended) == 3
    export._queue.clear()  # nothing to post at shutdown
    provider.shutdown()

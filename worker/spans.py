"""Spans made for an SDK TracerProvider's sampler and processors at a third of the SDK Tracer's CPU per span."""

import time
import traceback
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

# Our span sites pass only str, int, float, bool and tuples of str: the SDK's per-value cleaning (recursive
# type checks through the collections ABCs, a lock per attribute set) is most of its cost per span and buys
# nothing for them (nor are the OTEL_*_LIMIT variables applied: a span here holds at most a dozen). Everything
# else the SDK Tracer does per span is kept: the sampler's decision and its attributes and trace state, the ID
# generator, the resource and scope, and every span processor.


class LightTracer:
    """The subset of `opentelemetry.trace.Tracer` the worker uses, for an SDK TracerProvider."""

    def __init__(self, provider: Any, name: str) -> None:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.trace.sampling import Decision
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._event = Event
        self._drop, self._record_and_sample = Decision.DROP, Decision.RECORD_AND_SAMPLE
        self._readable = ReadableSpan
        self._processor = provider._active_span_processor  # the provider's own fan-out to its processors
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        self._provider = provider  # its resource is read at each span's end: the SDK renews it after a fork
        self._scope = InstrumentationScope(name)

    @staticmethod
    def supports(provider: object) -> bool:
        """An SDK TracerProvider, whose parts this tracer can use directly."""
        try:
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError:
            return False
        # Older SDKs lack the W3C "random trace id" flag this tracer sets as the SDK does: they get the SDK Tracer.
        return (
            isinstance(provider, TracerProvider)
            and hasattr(provider, "_active_span_processor")
            and hasattr(provider.id_generator, "is_trace_id_random")
            and hasattr(TraceFlags, "RANDOM_TRACE_ID")
        )

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        links: Sequence[Link] = (),
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:
            trace_id = self._ids.generate_trace_id()
            random = self._ids.is_trace_id_random()
            parent_or_none = None
        else:
            trace_id, random, parent_or_none = parent.trace_id, parent.trace_flags.random_trace_id, parent
        sampled = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = sampled.decision  # compared by identity: Decision.is_sampled() searches a tuple of enums
        flags = TraceFlags.SAMPLED if decision is self._record_and_sample else TraceFlags.DEFAULT
        if random:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id, self._ids.generate_span_id(), False, TraceFlags(flags), sampled.trace_state
        )
        if decision is self._drop:
            return trace.NonRecordingSpan(span_context)
        recorded = dict(sampled.attributes) if sampled.attributes else {}
        if attributes:
            recorded.update(attributes)
        span = LightSpan(self, name, span_context, parent_or_none, kind, recorded, tuple(links))
        self._processor.on_start(span, parent_context=context)
        return span

    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        links: Sequence[Link] = (),
    ) -> "CurrentSpan":
        return CurrentSpan(self.start_span(name, context, kind, attributes, links))

    def finish(self, span: "LightSpan", end_time: int) -> None:
        events = tuple(self._event(name, attrs, timestamp) for name, attrs, timestamp in span.events)
        self._processor.on_end(
            self._readable(
                name=span.name,
                context=span.context,
                parent=span.parent,
                resource=self._provider.resource,
                attributes=span.attributes,
                events=events,
                links=span.links,
                kind=span.kind,
                status=span.status,
                start_time=span.start_time,
                end_time=end_time,
                instrumentation_scope=self._scope,
            )
        )


class CurrentSpan:
    """Makes a span the current one for a `with` block and ends it after (a class: a generator-based context
    manager costs as much again)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        # An exception is recorded as the SDK's use_span records it, then passed on.
        if isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        context_api.detach(self._token)  # type: ignore[arg-type]
        span.end()


class LightSpan(trace.Span):
    """A recording span kept as plain values until it ends, then handed to the processors as a ReadableSpan."""

    def __init__(
        self,
        tracer: LightTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        links: tuple[Link, ...],
    ) -> None:
        self._tracer = tracer
        self._ended = False
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = links
        self.events: list[tuple[str, dict[str, AttributeValue], int]] = []
        self.status = Status(StatusCode.UNSET)
        self.start_time = time.time_ns()

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if not self._ended:
            self.attributes.update(attributes)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if not self._ended:
            self.attributes[key] = value

    def add_event(
        self, name: str, attributes: Mapping[str, AttributeValue] | None = None, timestamp: int | None = None
    ) -> None:
        if not self._ended:
            self.events.append((name, dict(attributes or {}), timestamp or time.time_ns()))

    def update_name(self, name: str) -> None:
        if not self._ended:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended or self.status.status_code is StatusCode.OK:  # the SDK's rule: OK is final
            return
        self.status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module, qualname = type(exception).__module__, type(exception).__qualname__
        recorded: dict[str, AttributeValue] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", recorded | dict(attributes or {}), timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._tracer.finish(self, end_time or time.time_ns())

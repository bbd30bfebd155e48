"""Spans made for an SDK TracerProvider's sampler and processors at a third of the SDK Tracer's CPU per span."""

import time
import traceback
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from worker.tracing.current_span import attach, current_span, detach

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
        # The sampler's decision where it depends only on the parent (always_on, always_off, parentbased_* with
        # the default delegates): looked up instead of asking the sampler, which costs a third of a span's start.
        self._at_root, self._by_parent = fixed_decisions(provider.sampler)
        self._ids = provider.id_generator
        self._provider = provider  # its resource is read at each span's end: the SDK renews it after a fork
        self._scope = InstrumentationScope(name)
        self._processors: object = None
        self._light: Any = None

    def _light_processor(self) -> Any:
        """The provider's only processor when it takes a LightSpan as it is (`on_end_light`), else None;
        looked up again whenever processors are added."""
        processors: tuple[Any, ...] = getattr(self._processor, "_span_processors", ())
        if processors is not self._processors:
            self._processors = processors
            only = processors[0] if len(processors) == 1 else None
            self._light = only if callable(getattr(only, "on_end_light", None)) else None
        return self._light

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
        parent = (current_span() if context is None else trace.get_current_span(context)).get_span_context()
        return self.start_child(name, parent if parent.is_valid else None, kind, attributes, links, context)

    def start_child(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        links: Sequence[Link] = (),
        context: Context | None = None,
    ) -> trace.Span:
        """A span under `parent` (None: a new trace). `context` is what the sampler and processors are shown;
        without one, a span whose parent is not the current span is shown a Context holding that parent alone,
        as a propagator's extract would have made it."""
        if parent is not None:
            trace_id, random = parent.trace_id, parent.trace_flags.random_trace_id
            decision = self._by_parent[parent.is_remote][parent.trace_flags & 1] if self._by_parent else None
        else:
            trace_id = self._ids.generate_trace_id()
            random = self._ids.is_trace_id_random()
            decision = self._at_root
        light = self._light_processor()
        if context is None and (decision is None or light is None) and parent is not current_span().get_span_context():
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else Context()
        if decision is None:
            sampled = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            decision, trace_state = sampled.decision, sampled.trace_state
            if sampled.attributes:
                attributes = {**sampled.attributes, **(attributes or {})}
        else:  # a fixed decision adds no attributes and keeps the parent's trace state, as the SDK's does
            trace_state = parent.trace_state if parent is not None else None
        # Decisions are compared by identity: Decision.is_sampled() searches a tuple of enums.
        flags = _FLAGS[(decision is self._record_and_sample) | (random << 1)]
        span_context = SpanContext(trace_id, self._ids.generate_span_id(), False, flags, trace_state)
        if decision is self._drop:
            return trace.NonRecordingSpan(span_context)
        span = LightSpan(self, name, span_context, parent, kind, dict(attributes or ()), tuple(links))
        if light is None:  # a processor taking light spans has nothing to do at the start
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
        light = self._light_processor()
        if light is not None:
            light.on_end_light(span, end_time, self._provider.resource, self._scope)
            return
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


_FLAGS: Final = tuple(TraceFlags(flags) for flags in range(4))  # sampled = 1, random trace id = 2
_UNSET: Final = Status(StatusCode.UNSET)


def fixed_decisions(sampler: Any) -> tuple[Any, tuple[tuple[Any, Any], tuple[Any, Any]] | None]:
    """The decision for a root span and, by [parent is remote][parent is sampled], for a child, wherever the
    SDK's sampler would decide without looking at the span; None where it must be asked."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased

    def fixed(delegate: object) -> Decision | None:
        if delegate is ALWAYS_ON:
            return Decision.RECORD_AND_SAMPLE
        if delegate is ALWAYS_OFF:
            return Decision.DROP
        return None

    if fixed(sampler) is not None:
        return fixed(sampler), ((fixed(sampler),) * 2,) * 2
    if not isinstance(sampler, ParentBased) or type(sampler).should_sample is not ParentBased.should_sample:
        return None, None
    local = (getattr(sampler, "_local_parent_not_sampled", None), getattr(sampler, "_local_parent_sampled", None))
    remote = (getattr(sampler, "_remote_parent_not_sampled", None), getattr(sampler, "_remote_parent_sampled", None))
    by_parent = ((fixed(local[0]), fixed(local[1])), (fixed(remote[0]), fixed(remote[1])))
    if None in by_parent[0] or None in by_parent[1]:
        return None, None
    return fixed(getattr(sampler, "_root", None)), by_parent


class CurrentSpan:
    """Makes a span the current one for a `with` block and ends it after (a class: a generator-based context
    manager costs as much again)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = attach(self._span)
        return self._span

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        # An exception is recorded as the SDK's use_span records it, then passed on.
        if isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        detach(self._token)
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
        self.status = _UNSET
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

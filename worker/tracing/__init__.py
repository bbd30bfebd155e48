"""OpenTelemetry tracing: W3C context through AMQP headers, spans for delivery, model call, policy and settle."""

import functools
import os
import time
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

import orjson
import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

from contracts import Header
from worker.errors import ProviderError
from worker.handling.outcome import RequestIds
from worker.ops.genai_metrics import GenAIMetrics
from worker.tracing import w3c
from worker.tracing.current_span import current_span
from worker.tracing.otlp_config import BatchLimits, OtlpTarget, credential_provider_requested
from worker.tracing.spans import CurrentSpan, LightTracer

if TYPE_CHECKING:  # the providers import this module: a runtime import would be circular
    from aio_pika.abc import AbstractIncomingMessage  # only the broker folder imports aio-pika at run time

    from worker.handling.policy import Decision
    from worker.providers.base import ModelCall, ModelResult

log = structlog.get_logger("worker.tracing")

SERVICE_NAME: Final = "atlas-inference-worker"
CAPTURE_CONTENT_ENV: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
TRACE_HEADERS: Final = ("traceparent", "tracestate")
OTHER: Final = "_OTHER"  # the conventions' value for anything outside a closed set
OPERATION: Final = "chat"
# gen_ai.provider.name for each provider kind; a compatible server speaks OpenAI's API.
PROVIDER_NAMES: Final = {
    "azure_openai": "azure.ai.openai",
    "bedrock": "aws.bedrock",
    "vertex": "gcp.vertex_ai",
    "openai_compatible": "openai",
    "ollama": "ollama",
}
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
MESSAGING: Final[dict[str, AttributeValue]] = {"messaging.system": "rabbitmq"}

_NOTHING: AbstractContextManager[None] = nullcontext()


class DescribedProvider(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def model(self) -> str: ...


class Tracing:
    """The worker's tracer and GenAI metrics. Without a tracer provider (the default) no span is made: the only
    per-message work left is copying the request's trace headers onto the reply, so the trace is not cut."""

    def __init__(
        self,
        provider: TracerProvider | None = None,
        *,
        genai: GenAIMetrics | None = None,
        capture_content: bool = False,
    ) -> None:
        self.enabled = provider is not None
        self._provider = provider
        self._tracer: trace.Tracer | LightTracer
        if provider is not None and LightTracer.supports(provider):
            self._tracer = LightTracer(provider, SERVICE_NAME)
        else:
            self._tracer = (provider or trace.NoOpTracerProvider()).get_tracer(SERVICE_NAME)
        self.genai = genai
        self.capture_content = capture_content

    def shutdown(self) -> None:
        """Export what is still buffered and stop (blocking: call it off the event loop)."""
        shutdown = getattr(self._provider, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def delivery(self, message: "AbstractIncomingMessage", queue: str) -> AbstractContextManager[object]:
        """The consumer span of one delivery, a child of the publisher's span; a copy the worker republished
        (retry, deferral) is also linked to the settle step that made it, so every attempt shows in one trace."""
        if not self.enabled:
            return _NOTHING
        headers = message.headers or {}
        parent = w3c.remote_parent(headers)
        links: list[Link] = []
        if parent is not None and (Header.ATTEMPTS in headers or Header.DEFERRALS in headers):
            links.append(Link(parent, {"atlas.link": "earlier_delivery"}))
        attributes = {
            **MESSAGING,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": queue,
            "messaging.message.body.size": len(message.body),
        }
        if message.message_id:
            attributes["messaging.message.id"] = message.message_id
        if message.correlation_id:
            attributes["messaging.message.conversation_id"] = message.correlation_id
        name = f"process {queue}"
        if isinstance(self._tracer, LightTracer):
            return CurrentSpan(self._tracer.start_child(name, parent, SpanKind.CONSUMER, attributes, links))
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else Context()
        return self._tracer.start_as_current_span(
            name, context=context, kind=SpanKind.CONSUMER, attributes=attributes, links=links
        )

    def annotate_delivery(self, ids: RequestIds, attempt: int) -> None:
        """What decoding told about the current delivery: whose request it is and which attempt."""
        if self.enabled:
            self.annotate(
                {
                    "atlas.request_id": ids.request_id,
                    "atlas.tenant_id": ids.tenant_id,
                    "atlas.task": ids.task,
                    "atlas.attempt": attempt,
                }
            )

    def span(self, name: str, attributes: Mapping[str, AttributeValue]) -> AbstractContextManager[object]:
        """An internal span (the policy decision, the settle step) under the current one."""
        if not self.enabled:
            return _NOTHING
        return self._tracer.start_as_current_span(name, attributes=attributes)

    def policy_decided(self, policy: str, error_class: str, attempts: int, decision: "Decision") -> None:
        """A span for the fallback policy's decision (pure and instant, so it is recorded once it is made)."""
        if self.enabled:
            attributes: dict[str, AttributeValue] = {
                "atlas.policy": policy,
                "error.type": error_class,
                "atlas.attempt": attempts,
                "atlas.policy.action": decision.action.value,
                "atlas.policy.reason": decision.reason,
            }
            if decision.retry_level is not None:
                attributes["atlas.retry.level"] = decision.retry_level
            self._tracer.start_span("fallback_policy", attributes=attributes).end()

    def annotate(self, attributes: Mapping[str, AttributeValue | None]) -> None:
        """Add attributes to the current span (None values are left out)."""
        if not self.enabled:
            return
        span = current_span()
        if span.is_recording():
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def publish(
        self, exchange: str, routing_key: str, headers: MutableMapping[str, Any], incoming: Mapping[str, Any] | None
    ) -> AbstractContextManager[object]:
        """Put the current (settle) span's context into a publish's `headers`, replacing any trace headers there,
        and record the publish as an event of that span: a span of its own would cost as much as the settle
        span for nothing a trace reader needs. Off, the incoming request's trace headers are carried over as
        they came (the reply continues the caller's trace)."""
        if not self.enabled:
            for key in TRACE_HEADERS:
                if (value := w3c.header(incoming or {}, key)) is not None:
                    headers.setdefault(key, value)
            return _NOTHING
        for key in TRACE_HEADERS:
            headers.pop(key, None)  # a copy's headers still hold the context it arrived with
        span = current_span()
        w3c.write(span.get_span_context(), headers)
        if span.is_recording():
            span.add_event(
                "publish",
                {
                    "messaging.destination.name": exchange or "amq.default",
                    "messaging.rabbitmq.destination.routing_key": routing_key,
                },
            )
        return _NOTHING

    def model_call(self, provider: DescribedProvider, call: "ModelCall") -> "ModelCallTelemetry":
        return ModelCallTelemetry(self, provider, call)

    def _start_model_span(self, provider: DescribedProvider, call: "ModelCall", name: str) -> trace.Span:
        address, port = server_address(provider.endpoint)
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": name,
            "gen_ai.request.model": provider.model,
            "gen_ai.request.max_tokens": call.max_output_tokens,
        }
        if call.temperature is not None:
            attributes["gen_ai.request.temperature"] = call.temperature
        if address:
            attributes["server.address"] = address
        if port:
            attributes["server.port"] = port
        if self.capture_content:
            attributes |= _input_content(call)
        return self._tracer.start_span(f"{OPERATION} {provider.model}", kind=SpanKind.CLIENT, attributes=attributes)


class ModelCallTelemetry:
    """Times one model call for the GenAI metrics and, with tracing on, records it as a client span."""

    __slots__ = ("_call", "_provider", "_result", "_span", "_started", "_tracing")

    def __init__(self, tracing: Tracing, provider: DescribedProvider, call: "ModelCall") -> None:
        self._tracing = tracing
        self._provider = provider
        self._call = call
        self._result: ModelResult | None = None
        self._span: trace.Span | None = None
        self._started = 0.0

    def __enter__(self) -> "ModelCallTelemetry":
        self._started = time.perf_counter()
        if self._tracing.enabled:
            self._span = self._tracing._start_model_span(self._provider, self._call, provider_name(self._provider.kind))
        return self

    def answered(self, result: "ModelResult") -> "ModelResult":
        self._result = result
        return result

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        seconds = time.perf_counter() - self._started
        result = self._result
        error_type = "" if exc is None else (exc.error_class.value if isinstance(exc, ProviderError) else OTHER)
        if self._tracing.genai is not None:
            self._tracing.genai.observe(
                OPERATION,
                provider_name(self._provider.kind),
                seconds,
                input_tokens=result.input_tokens if result else 0,
                output_tokens=result.output_tokens if result else 0,
                error_type=error_type,
            )
        span = self._span
        if span is None:
            return
        if exc is not None:
            span.set_attribute("error.type", error_type if error_type != OTHER else type(exc).__qualname__)
            if isinstance(exc, ProviderError):
                span.set_attribute("atlas.error.code", exc.code)
            span.set_status(Status(StatusCode.ERROR))
        elif result is not None and span.is_recording():
            span.set_attributes(_result_attributes(result, capture_content=self._tracing.capture_content))
        span.end()


def _result_attributes(result: "ModelResult", *, capture_content: bool) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {"gen_ai.response.finish_reasons": (result.finish.value,)}
    if result.model:
        attributes["gen_ai.response.model"] = result.model
    if result.input_tokens:
        attributes["gen_ai.usage.input_tokens"] = result.input_tokens
    if result.output_tokens:
        attributes["gen_ai.usage.output_tokens"] = result.output_tokens
    if capture_content:
        parts: list[dict[str, Any]] = [{"type": "text", "content": result.text}] if result.text is not None else []
        parts += [{"type": "tool_call", "id": c.id, "name": c.name} for c in result.tool_calls]
        output = [{"role": "assistant", "parts": parts, "finish_reason": result.finish.value}]
        attributes["gen_ai.output.messages"] = orjson.dumps(output).decode()
    return attributes


def _input_content(call: "ModelCall") -> dict[str, AttributeValue]:
    """The prompt in the conventions' JSON shapes; recorded only when content capture is switched on."""
    messages = [{"role": turn.role, "parts": [{"type": "text", "content": turn.content}]} for turn in call.turns]
    return {
        "gen_ai.system_instructions": orjson.dumps([{"type": "text", "content": call.system}]).decode(),
        "gen_ai.input.messages": orjson.dumps(messages).decode(),
    }


def provider_name(kind: str) -> str:
    return PROVIDER_NAMES.get(kind, OTHER)


@functools.lru_cache(maxsize=256)  # a tenant's endpoint, parsed once rather than on every model call
def server_address(endpoint: str) -> tuple[str | None, int | None]:
    """Host and port only: user info, path and query (where credentials hide) are never recorded."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname, port or DEFAULT_PORTS.get(parts.scheme)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def content_capture_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Prompts and completions go into spans only when the operator switches content capture on."""
    return _flag(environ.get(CAPTURE_CONTENT_ENV))


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Tracing is on when an exporter or an OTLP endpoint is configured, and the SDK is not disabled."""
    if _flag(environ.get("OTEL_SDK_DISABLED")):
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return bool(exporters or endpoint)


def tracing_from_env(genai: GenAIMetrics | None = None, environ: Mapping[str, str] = os.environ) -> Tracing:
    """Tracing configured by the standard OTEL_* variables: the SDK reads the sampler and the resource; OTLP
    export (endpoint, headers, timeout, compression, certificates, OTEL_BSP_* batching) runs on the event loop
    (`worker.tracing.otlp_export`). Without the `otel` extra installed, tracing stays off with a warning."""
    capture = content_capture_requested(environ)
    if not tracing_requested(environ):
        return Tracing(genai=genai, capture_content=capture)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("tracing_unavailable", hint="install the otel extra: pip install 'atlas-inference-worker[otel]'")
        return Tracing(genai=genai, capture_content=capture)
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over this default.
    named = "OTEL_SERVICE_NAME" in environ or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = SdkTracerProvider(resource=Resource.create({} if named else {"service.name": SERVICE_NAME}))
    exporters: list[str] = []
    for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").lower().split(","):
        match name.strip():
            case "otlp" if not credential_provider_requested(environ):
                from worker.tracing.otlp_export import LoopSpanExport

                provider.add_span_processor(LoopSpanExport(OtlpTarget.from_env(environ), BatchLimits.from_env(environ)))
                exporters.append(LoopSpanExport.__name__)
            case "otlp":  # a requests.Session from a credential plug-in: the SDK's exporter, on its thread
                from worker.tracing.otlp_encoding import otlp_span_exporter

                provider.add_span_processor(BatchSpanProcessor(otlp_span_exporter()))
                exporters.append("OTLPSpanExporter")
            case "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
                exporters.append(ConsoleSpanExporter.__name__)
            case other:
                log.warning("tracing_exporter_unsupported", exporter=other, supported="otlp, console")
    log.info(
        "tracing_enabled",
        exporters=exporters,
        sampler=environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        capture_content=capture,
    )
    return Tracing(provider, genai=genai, capture_content=capture)


NO_TRACING: Final = Tracing()

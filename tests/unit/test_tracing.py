"""Tracing configuration from OTEL_* variables, credential-free server attributes, and opt-in content capture."""

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from worker.errors import ErrorClass, ProviderError
from worker.ops.genai_metrics import GenAIMetrics
from worker.providers.base import Finish, ModelCall, ModelResult, Turn
from worker.tracing import Tracing, provider_name, server_address, tracing_from_env, tracing_requested


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "w"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_tracing_is_on_only_when_an_exporter_or_endpoint_is_configured(environ: dict[str, str], on: bool) -> None:
    assert tracing_requested(environ) is on
    assert tracing_from_env(environ=environ).enabled is on


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("https://user:s3cret@acme.openai.azure.com/openai?api-key=k", ("acme.openai.azure.com", 443)),
        ("http://10.0.0.5:8000/v1", ("10.0.0.5", 8000)),
        ("http://ollama", ("ollama", 80)),
    ],
)
def test_server_address_keeps_host_and_port_only(endpoint: str, expected: tuple[str, int]) -> None:
    assert server_address(endpoint) == expected


def test_provider_names_follow_the_genai_conventions() -> None:
    kinds = ["azure_openai", "bedrock", "vertex", "openai_compatible", "ollama", "fake"]
    names = ["azure.ai.openai", "aws.bedrock", "gcp.vertex_ai", "openai", "ollama", "_OTHER"]
    assert [provider_name(k) for k in kinds] == names


class Endpoint:
    kind = "ollama"
    endpoint = "http://ollama.internal:11434"
    model = "llama3.1"


CALL = ModelCall(
    system="You are an SRE.", turns=(Turn("user", "db pool exhausted on checkout"),), max_output_tokens=64, timeout_s=5
)
RESULT = ModelResult("raise the pool size", Finish.STOP, input_tokens=12, output_tokens=5, model="llama3.1:8b")


def traced(capture_content: bool) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider, capture_content=capture_content), exporter


@pytest.mark.parametrize("capture", [False, True])
def test_prompt_and_completion_are_recorded_only_with_content_capture(capture: bool) -> None:
    tracing, exporter = traced(capture)
    with tracing.model_call(Endpoint(), CALL) as telemetry:
        telemetry.answered(RESULT)
    [span] = exporter.get_finished_spans()
    text = str(dict(span.attributes or {}))
    for secret_ish in ("db pool exhausted", "You are an SRE", "raise the pool size"):
        assert (secret_ish in text) is capture
    assert dict(span.attributes or {})["gen_ai.response.model"] == "llama3.1:8b"


def test_failed_call_is_an_error_span_and_a_metric_with_its_error_class() -> None:
    tracing, exporter = traced(False)
    registry = CollectorRegistry()
    tracing.genai = GenAIMetrics(registry)
    with pytest.raises(ProviderError), tracing.model_call(Endpoint(), CALL):
        raise ProviderError(ErrorClass.RATE_LIMITED, "429 from ollama", code="rate_limited")
    [span] = exporter.get_finished_spans()
    assert dict(span.attributes or {})["error.type"] == "rate_limited"
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "ollama", "error_type": "rate_limited"}
    assert registry.get_sample_value("gen_ai_client_operation_duration_seconds_count", labels) == 1
    assert (
        registry.get_sample_value("gen_ai_client_token_usage_count", {**labels, "gen_ai_token_type": "input"}) is None
    )


def test_without_a_tracer_provider_no_span_is_made_but_metrics_are_kept() -> None:
    registry = CollectorRegistry()
    tracing = Tracing(genai=GenAIMetrics(registry))
    with tracing.model_call(Endpoint(), CALL) as telemetry:
        telemetry.answered(RESULT)
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "ollama", "gen_ai_token_type": "output"}
    assert registry.get_sample_value("gen_ai_client_token_usage_sum", labels) == 5


def test_a_span_left_by_an_exception_is_an_error_with_the_exception_recorded() -> None:
    tracing, exporter = traced(False)
    with pytest.raises(RuntimeError), tracing.span("settle", {"messaging.system": "rabbitmq"}):
        raise RuntimeError("channel closed")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RuntimeError: channel closed"
    [event] = span.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.type"] == "RuntimeError"


def test_the_providers_sampler_decides_and_an_unsampled_publish_still_carries_the_context() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    headers: dict[str, object] = {}
    with tracing.span("settle", {}), tracing.publish("", "replies", headers, None):
        pass
    assert exporter.get_finished_spans() == ()
    assert isinstance(headers["traceparent"], str)
    assert int(headers["traceparent"].rsplit("-", 1)[1], 16) & 1 == 0  # "not sampled", for the next service

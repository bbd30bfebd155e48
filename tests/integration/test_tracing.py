"""Traces across the queue: the publisher's context in, spans for each step, the context out on every publish."""

import itertools
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from contracts import InferenceReply, Status, Topology
from tests import samples
from tests.broker import BrokerClient, collect
from tests.conftest import RunningWorker, start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.fakes.otlp_receiver import OtlpReceiver
from tests.ops.scrape import free_port, scrape
from tests.scene import tenants_reloaded

pytestmark = pytest.mark.broker


class Upstream:
    """The publishing service's span, as its W3C `traceparent` header."""

    def __init__(self) -> None:
        self.trace_id = secrets.randbits(128)
        self.span_id = secrets.randbits(64)
        self.headers = {"traceparent": f"00-{self.trace_id:032x}-{self.span_id:016x}-01", "tracestate": "up=1"}


def traceparent_ids(value: object) -> tuple[int, int]:
    assert isinstance(value, str)
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


async def traced_worker(
    amqp_url: str, topology: Topology, tenants_dir: Path, provider: TracerProvider, **settings: object
) -> RunningWorker:
    return await start_worker(worker_settings(amqp_url, topology, tenants_dir, **settings), tracer_provider=provider)


def named(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_time or 0)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def descends_from(span: ReadableSpan, ancestor: ReadableSpan, spans: tuple[ReadableSpan, ...]) -> bool:
    by_id = {s.context.span_id: s for s in spans if s.context}
    current: ReadableSpan | None = span
    while current is not None:
        if current.context and ancestor.context and current.context.span_id == ancestor.context.span_id:
            return True
        current = by_id.get(parent_id(current) or 0)
    return False


def attribute_text(spans: tuple[ReadableSpan, ...]) -> str:
    recorded = [s.attributes for s in spans] + [e.attributes for s in spans for e in s.events]
    return "\n".join(f"{k}={v!s}" for attributes in recorded for k, v in (attributes or {}).items())


async def test_request_with_traceparent_is_continued_by_consumer_model_call_and_reply(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    port = free_port()
    running = await traced_worker(amqp_url, topology, tenants_dir, tracer_provider, metrics_port=port)
    upstream = Upstream()
    replies = await client.reply_queue()
    body = samples.request("acme", "summary")
    try:
        await client.publish_request(body, reply_to=replies.name, correlation_id="c-1", headers=upstream.headers)
        [reply_message] = await collect(replies, 1)
        metrics = await scrape(port)
    finally:
        await running.stop()  # every delivery's spans have ended once the worker drained

    assert InferenceReply.model_validate_json(reply_message.body).status is Status.OK
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans if s.context} == {upstream.trace_id}
    [consumer] = named(spans, "process ")
    assert consumer.name == f"process {topology.requests}"
    assert consumer.kind is SpanKind.CONSUMER
    assert parent_id(consumer) == upstream.span_id
    assert consumer.links == ()
    attributes = dict(consumer.attributes or {})
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == topology.requests
    assert attributes["messaging.message.conversation_id"] == "c-1"
    assert attributes["atlas.request_id"] == body["request_id"]
    assert attributes["atlas.attempt"] == 1

    [model] = named(spans, "chat ")
    assert model.name == "chat fake-model"
    assert model.kind is SpanKind.CLIENT
    assert descends_from(model, consumer, spans)
    gen_ai = dict(model.attributes or {})
    assert gen_ai["gen_ai.operation.name"] == "chat"
    assert gen_ai["gen_ai.provider.name"] == "openai"
    assert gen_ai["gen_ai.request.model"] == "fake-model"
    assert gen_ai["gen_ai.response.model"] == "fake-model"
    assert gen_ai["gen_ai.response.finish_reasons"] == ("stop",)
    input_tokens, output_tokens = gen_ai["gen_ai.usage.input_tokens"], gen_ai["gen_ai.usage.output_tokens"]
    assert isinstance(input_tokens, int)
    assert isinstance(output_tokens, int)
    assert input_tokens > 0
    assert output_tokens > 0
    assert gen_ai["server.address"] == "127.0.0.1"
    assert "error.type" not in gen_ai

    [settle] = named(spans, "settle")
    assert parent_id(settle) == consumer.context.span_id
    assert dict(settle.attributes or {})["atlas.settle.result"] == "replied"
    assert named(spans, "publish") == []  # a publish is an event of the settle span, not a span of its own
    [publish] = [event for event in settle.events if event.name == "publish"]
    assert dict(publish.attributes or {}) == {
        "messaging.destination.name": "amq.default",
        "messaging.rabbitmq.destination.routing_key": replies.name,
    }
    # The RCA engine's consumer continues the trace from the worker's settle span.
    headers = reply_message.headers or {}
    assert traceparent_ids(headers["traceparent"]) == (upstream.trace_id, settle.context.span_id)
    assert headers["tracestate"] == "up=1"

    # Neither the prompt nor the key is in any span; the fake proves the prompt was sent.
    title = body["incident"]["title"]
    assert title in str(fake_openai.requests[-1]["messages"])
    text = attribute_text(spans)
    assert title not in text
    assert "sk-test-fake" not in text
    assert "gen_ai.input.messages" not in text

    duration = "gen_ai_client_operation_duration_seconds_count"
    assert metrics.value(duration, gen_ai_provider_name="openai", gen_ai_operation_name="chat", error_type="") == 1
    assert metrics.value("gen_ai_client_token_usage_count", gen_ai_token_type="input") == 1
    assert (
        metrics.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output")
        == gen_ai["gen_ai.usage.output_tokens"]
    )


async def test_request_retried_twice_is_three_linked_deliveries_in_one_trace(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    flaky = FakeOpenAI()
    flaky.faults.extend([Fault("server_error"), Fault("server_error")])
    await flaky.start()
    write_tenant(tenants_dir, "retrier", flaky.base_url, policy="queue_and_retry", max_attempts=3)
    port = free_port()
    running = await traced_worker(amqp_url, topology, tenants_dir, tracer_provider, metrics_port=port)
    upstream = Upstream()
    replies = await client.reply_queue()
    try:
        await client.publish_request(samples.request("retrier"), reply_to=replies.name, headers=upstream.headers)
        [reply_message] = await collect(replies, 1)
        metrics = await scrape(port)
    finally:
        await running.stop()
        await flaky.close()

    reply = InferenceReply.model_validate_json(reply_message.body)
    assert reply.status is Status.OK
    assert reply.provenance.attempts == 3
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans if s.context} == {upstream.trace_id}
    deliveries = named(spans, "process ")
    assert [dict(d.attributes or {})["atlas.attempt"] for d in deliveries] == [1, 2, 3]
    assert parent_id(deliveries[0]) == upstream.span_id
    assert deliveries[0].links == ()
    for earlier, later in itertools.pairwise(deliveries):
        [link] = later.links
        # The retry copy carried the context of the settle step that parked it, under the earlier delivery.
        [parking] = [s for s in named(spans, "settle") if s.context.span_id == link.context.span_id]
        assert parent_id(parking) == earlier.context.span_id
        assert [dict(e.attributes or {})["messaging.destination.name"] for e in parking.events] == [topology.retry]
        assert parent_id(later) == parking.context.span_id
        assert dict(link.attributes or {})["atlas.link"] == "earlier_delivery"
    policies = named(spans, "fallback_policy")
    assert [dict(p.attributes or {})["atlas.policy.action"] for p in policies] == ["retry", "retry"]
    assert all(dict(p.attributes or {})["error.type"] == "transient" for p in policies)
    models = named(spans, "chat ")
    assert [dict(m.attributes or {}).get("error.type") for m in models] == ["transient", "transient", None]
    duration = "gen_ai_client_operation_duration_seconds_count"
    assert metrics.value(duration, error_type="transient") == 2
    assert metrics.value(duration, error_type="") == 1


async def test_tracing_off_reply_still_carries_the_callers_trace_context(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path
) -> None:
    async with tenants_reloaded(worker.app):
        write_tenant(tenants_dir, "acme", fake_openai.base_url)
    upstream = Upstream()
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme"), reply_to=replies.name, headers=upstream.headers)

    [message] = await collect(replies, 1)
    headers = message.headers or {}
    assert headers["traceparent"] == upstream.headers["traceparent"]
    assert headers["tracestate"] == "up=1"


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    await receiver.start()
    yield receiver
    await receiver.close()


async def test_otel_environment_exports_spans_over_otlp_http(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    fake_openai: FakeOpenAI,
    otlp_receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "atlas-worker-under-test")
    write_tenant(tenants_dir, "acme", fake_openai.base_url)
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir))
    upstream = Upstream()
    replies = await client.reply_queue()
    try:
        await client.publish_request(samples.request("acme"), reply_to=replies.name, headers=upstream.headers)
        await collect(replies, 1)
    finally:
        await running.stop()  # the worker flushes its batch of spans on the way out

    assert otlp_receiver.content_types[0] == "application/x-protobuf"
    assert otlp_receiver.service_names() == {"atlas-worker-under-test"}
    spans = otlp_receiver.spans()
    names = {span.name for span in spans}
    assert {f"process {topology.requests}", "chat fake-model", "settle"} <= names
    assert {span.trace_id for span in spans} == {upstream.trace_id.to_bytes(16, "big")}
    [model] = [span for span in spans if span.name == "chat fake-model"]
    attributes = {a.key: a.value for a in model.attributes}
    assert attributes["gen_ai.provider.name"].string_value == "openai"
    assert attributes["gen_ai.usage.input_tokens"].int_value > 0


async def test_reroute_and_dead_letter_carry_the_workers_context_in_the_same_trace(
    amqp_url: str,
    client: BrokerClient,
    topology: Topology,
    tenants_dir: Path,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    settings = worker_settings(amqp_url, topology, tenants_dir)
    cloud = await client.bind_observer(settings.atlas_cloud_exchange)
    running = await start_worker(settings, tracer_provider=tracer_provider)
    rerouted, malformed = Upstream(), Upstream()
    try:
        await client.publish_request(samples.request("no-byoc-tenant"), headers=rerouted.headers)
        await client.publish_request(b"{not json", headers=malformed.headers)
        [to_cloud] = await collect(cloud, 1)
        [dead_letter] = await collect(await client.channel.get_queue(topology.dead), 1)
    finally:
        await running.stop()

    spans = exporter.get_finished_spans()
    settles = {s.context.span_id: s for s in named(spans, "settle")}
    for message, upstream, exchange in (
        (to_cloud, rerouted, settings.atlas_cloud_exchange),
        (dead_letter, malformed, topology.dead),
    ):
        trace_id, span_id = traceparent_ids((message.headers or {})["traceparent"])
        assert trace_id == upstream.trace_id
        # The publisher's header was replaced by the worker's settle span, which recorded the publish.
        published = [dict(e.attributes or {}) for e in settles[span_id].events if e.name == "publish"]
        assert [p["messaging.destination.name"] for p in published] == [exchange]

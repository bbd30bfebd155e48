"""Spans exported from the event loop: batches by size and by time, every OTEL_* export setting, retries, bounds."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from structlog.testing import capture_logs

from tests.fakes.otlp_receiver import OtlpReceiver
from worker.tracing import tracing_from_env
from worker.tracing.otlp_config import BatchLimits, OtlpTarget
from worker.tracing.otlp_export import LoopSpanExport
from worker.tracing.spans import LightTracer


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    await receiver.start()
    yield receiver
    await receiver.close()


def traced(export: LoopSpanExport, **provider: object) -> tuple[TracerProvider, LightTracer]:
    tracer_provider = TracerProvider(resource=Resource.create({"service.name": "w"}), **provider)  # type: ignore[arg-type]
    tracer_provider.add_span_processor(export)
    return tracer_provider, LightTracer(tracer_provider, "atlas-inference-worker")


def end_spans(tracer: LightTracer, count: int, prefix: str = "s") -> None:
    for n in range(count):
        with tracer.start_as_current_span(f"{prefix}{n}", attributes={"n": n}):
            tracer.start_span("child").end()


async def test_a_full_batch_is_posted_at_once_and_the_rest_at_the_schedule_delay(receiver: OtlpReceiver) -> None:
    export = LoopSpanExport(
        OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"),
        BatchLimits(schedule_delay_s=0.3, max_queue_size=100, max_export_batch_size=10),
    )
    provider, tracer = traced(export)
    end_spans(tracer, 6)  # 12 spans: one full batch of 10, 2 left
    await asyncio.wait_for(receiver.arrived.wait(), 2)
    assert [len(scope.spans) for e in receiver.exports for r in e.resource_spans for scope in r.scope_spans] == [10]
    await asyncio.sleep(0.5)
    assert len(receiver.spans()) == 12  # the part batch, once the schedule delay passed
    assert receiver.service_names() == {"w"}
    assert {span.name for span in receiver.spans()} == {"child", *(f"s{n}" for n in range(6))}
    await asyncio.to_thread(provider.shutdown)


async def test_shutdown_from_another_thread_posts_what_is_queued(receiver: OtlpReceiver) -> None:
    export = LoopSpanExport(OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"), BatchLimits())
    provider, tracer = traced(export)
    end_spans(tracer, 3)
    assert receiver.exports == []  # far from a batch, long before the schedule delay
    await asyncio.to_thread(provider.shutdown)  # as the worker does on its way out
    assert len(receiver.spans()) == 6
    end_spans(tracer, 1)  # after shutdown: dropped, and no second shutdown hangs
    await asyncio.to_thread(provider.shutdown)
    assert len(receiver.spans()) == 6


async def test_spans_ended_outside_any_loop_are_posted_by_a_flush_of_their_own(receiver: OtlpReceiver) -> None:
    export = LoopSpanExport(OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"), BatchLimits())
    provider, tracer = traced(export)
    await asyncio.to_thread(end_spans, tracer, 2)  # a thread without a loop: the spans wait in the queue
    assert await asyncio.to_thread(export.force_flush) is True  # posted from a loop of the flush's own
    assert len(receiver.spans()) == 4
    await asyncio.to_thread(provider.shutdown)


async def test_the_otel_exporter_settings_are_honoured(receiver: OtlpReceiver) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # the traces endpoint wins over it
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/v1/traces",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20t0ken,x-tenant=acme",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
    }
    target, limits = OtlpTarget.from_env(environ), BatchLimits.from_env(environ)
    assert (target.timeout_s, target.compression, limits.max_export_batch_size) == (2.5, "gzip", 4)
    assert limits.schedule_delay_s == 60.0
    provider, tracer = traced(LoopSpanExport(target, limits))
    end_spans(tracer, 2)
    await asyncio.wait_for(receiver.arrived.wait(), 2)
    [headers] = receiver.headers
    assert headers["Authorization"] == "Bearer t0ken"
    assert headers["x-tenant"] == "acme"
    assert headers["Content-Encoding"] == "gzip"
    assert len(receiver.spans()) == 4  # decoded after gzip
    await asyncio.to_thread(provider.shutdown)


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({}, "http://localhost:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c/otlp"}, "https://c/otlp"),
    ],
)
def test_the_endpoint_follows_the_sdk_exporters_rules(environ: dict[str, str], endpoint: str) -> None:
    assert OtlpTarget.from_env(environ).endpoint == endpoint


def test_unusable_settings_fall_back_to_the_defaults_with_a_warning() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "soon",
        "OTEL_BSP_MAX_QUEUE_SIZE": "8",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16",
    }
    with capture_logs() as logs:
        target, limits = OtlpTarget.from_env(environ), BatchLimits.from_env(environ)
    assert (target.compression, target.timeout_s, limits) == ("none", 10.0, BatchLimits())
    assert {entry["event"] for entry in logs} == {
        "tracing_compression_unsupported",
        "tracing_setting_invalid",
        "tracing_batch_settings_invalid",
    }


async def test_a_collector_answering_503_is_tried_again(receiver: OtlpReceiver) -> None:
    receiver.refusals.append(503)
    limits = BatchLimits(max_export_batch_size=2)
    provider, tracer = traced(LoopSpanExport(OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"), limits))
    end_spans(tracer, 1)
    await asyncio.wait_for(receiver.arrived.wait(), 3)  # after a backoff of about a second
    assert len(receiver.headers) == 2  # refused once, then accepted
    assert len(receiver.spans()) == 2
    await asyncio.to_thread(provider.shutdown)


async def test_no_retry_is_waited_for_once_shutdown_began(receiver: OtlpReceiver) -> None:
    receiver.refusals.append(503)  # as the SDK's exporter: shutting down aborts the backoff
    provider, tracer = traced(LoopSpanExport(OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"), BatchLimits()))
    end_spans(tracer, 1)
    await asyncio.wait_for(asyncio.to_thread(provider.shutdown), 0.9)
    assert receiver.spans() == []


async def test_a_retry_after_that_is_no_number_of_seconds_waits_the_usual_backoff(receiver: OtlpReceiver) -> None:
    # float() reads "nan": asyncio's loop would then retry at once, uvloop's raise and lose the batch.
    receiver.refusals.append(503)
    receiver.retry_after = "nan"
    limits = BatchLimits(max_export_batch_size=2)
    provider, tracer = traced(LoopSpanExport(OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"), limits))
    end_spans(tracer, 1)
    await asyncio.wait_for(receiver.arrived.wait(), 3)
    assert len(receiver.spans()) == 2
    assert receiver.times[1] - receiver.times[0] >= 0.7  # the usual backoff: 1 s, give or take a fifth
    await asyncio.to_thread(provider.shutdown)


async def test_a_certificate_that_cannot_be_read_fails_the_export_with_a_log_line_not_an_exception() -> None:
    target = OtlpTarget(endpoint="https://127.0.0.1:9/v1/traces", certificate="/nonexistent/ca.pem", timeout_s=0.5)
    provider, tracer = traced(LoopSpanExport(target, BatchLimits()))
    end_spans(tracer, 1)
    with capture_logs() as logs:
        await asyncio.to_thread(provider.shutdown)  # the worker's way out: must not raise
    failed = [entry for entry in logs if entry["event"] == "tracing_export_failed"]
    assert len(failed) == 1
    assert "FileNotFoundError" in failed[0]["error"]


async def test_a_collector_refusing_the_request_is_not_tried_again(receiver: OtlpReceiver) -> None:
    receiver.refusals.append(400)
    provider, tracer = traced(LoopSpanExport(OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"), BatchLimits()))
    end_spans(tracer, 1)
    with capture_logs() as logs:
        await asyncio.to_thread(provider.shutdown)
    assert len(receiver.headers) == 1
    assert [entry["status"] for entry in logs if entry["event"] == "tracing_export_failed"] == [400]


async def test_spans_beyond_the_queue_are_dropped_and_counted(receiver: OtlpReceiver) -> None:
    export = LoopSpanExport(
        OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"),
        BatchLimits(max_queue_size=5, max_export_batch_size=5, schedule_delay_s=60),
    )
    provider, tracer = traced(export)
    with capture_logs() as logs:
        end_spans(tracer, 6)  # 12 spans into a queue of 5, ended before the loop can post any
        await asyncio.to_thread(provider.shutdown)
    assert len(receiver.spans()) == 5
    assert [entry["spans"] for entry in logs if entry["event"] == "tracing_spans_dropped"] == [7]


async def test_unsampled_spans_are_not_exported(receiver: OtlpReceiver) -> None:
    export = LoopSpanExport(OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces"), BatchLimits())
    provider, tracer = traced(export, sampler=ALWAYS_OFF)
    end_spans(tracer, 3)
    await asyncio.to_thread(provider.shutdown)
    assert receiver.exports == []


def test_otlp_tracing_from_the_environment_exports_from_the_loop() -> None:
    tracing = tracing_from_env(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    processors = tracing._provider._active_span_processor._span_processors  # type: ignore[union-attr]
    assert [type(p) for p in processors] == [LoopSpanExport]


def test_spans_ended_on_a_later_loop_are_posted_from_that_loop() -> None:
    export = LoopSpanExport(OtlpTarget(), BatchLimits(max_export_batch_size=2))
    provider, tracer = traced(export)

    async def one_loop() -> int:
        receiver = OtlpReceiver()
        await receiver.start()
        export.target = OtlpTarget(endpoint=f"{receiver.endpoint}/v1/traces")
        try:
            end_spans(tracer, 1)  # a full batch of 2: posted from the loop the spans end on
            await asyncio.wait_for(receiver.arrived.wait(), 2)
            return len(receiver.spans())
        finally:
            await receiver.close()

    assert asyncio.run(one_loop()) == 2
    assert asyncio.run(one_loop()) == 2  # the first loop, its session and its export task are gone
    provider.shutdown()


async def test_a_redirect_is_not_followed_with_the_spans_and_their_headers(receiver: OtlpReceiver) -> None:
    from aiohttp import web

    async def elsewhere(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{receiver.endpoint}/v1/traces")  # 307 keeps the method and the body

    app = web.Application()
    app.router.add_post("/v1/traces", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    export = LoopSpanExport(
        OtlpTarget(endpoint=f"http://127.0.0.1:{port}/v1/traces", headers={"api-key": "s3cret-collector-key"}),
        BatchLimits(),
    )
    provider, tracer = traced(export)
    end_spans(tracer, 2)
    with capture_logs() as logs:
        await asyncio.to_thread(provider.shutdown)
    await runner.cleanup()

    assert receiver.exports == []  # neither the spans nor the api-key reached the redirect's target
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["tracing_export_failed"]

"""Metrics bookkeeping without a broker: tenant labels stay bounded, breaker state is one-hot, nothing leaks."""

from datetime import UTC, datetime

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from contracts import ErrorInfo, InferenceReply, Provenance, Status, Timings, Usage
from tests.ops.scrape import Samples
from worker.broker.consumer import Settled
from worker.handling.outcome import DeadLetter, DeadLetterReason, Reply, RequestIds, Reroute, SettleResult
from worker.ops.health import HealthServer
from worker.ops.metrics import Metrics, endpoint_label

CONFIGURED = {"acme"}


def scrape(metrics: Metrics) -> Samples:
    return Samples(generate_latest(metrics.registry).decode())


def reply(tenant: str, status: Status = Status.OK) -> InferenceReply:
    now = datetime.now(UTC)
    return InferenceReply(
        request_id="r-1",
        tenant_id=tenant,
        task="rca",
        status=status,
        usage=Usage(input_tokens=1200, output_tokens=300),
        provenance=Provenance(provider_kind="azure_openai", attempts=1),
        timings=Timings(received_at=now, replied_at=now, provider_ms=1500.0),
    )


def test_only_tenants_with_a_config_file_become_label_values() -> None:
    metrics = Metrics(CONFIGURED.__contains__)
    for tenant in ("acme", "random-1", "random-2"):
        metrics.observe(Settled(RequestIds("r", tenant, "rca"), Reply(reply(tenant)), SettleResult.REPLIED, 10.0))

    samples = scrape(metrics)

    assert samples.label_values("tenant") == {"acme", "other"}
    assert samples.value("atlas_worker_settled_total", tenant="other") == 2
    assert samples.value("atlas_worker_tokens_total", tenant="acme", direction="input") == 1200
    assert samples.value("atlas_worker_provider_latency_seconds_sum", provider_kind="azure_openai") == 4.5


def test_unroutable_reply_and_reroute_are_counted_as_dead_letters_with_their_reason() -> None:
    metrics = Metrics(CONFIGURED.__contains__)
    lost = Reply(reply("acme", Status.OK))
    metrics.observe(Settled(RequestIds("r", "acme", "rca"), lost, SettleResult.DEAD_LETTERED, 10.0))
    metrics.observe(Settled(RequestIds("r", "acme", "rca"), Reroute("transient"), SettleResult.DEAD_LETTERED, 10.0))
    dead = DeadLetter(DeadLetterReason.EXHAUSTED, ErrorInfo(code="timeout", message="slow"), "azure_openai", 5)
    metrics.observe(
        Settled(
            RequestIds("r", "acme", "rca"), Reply(reply("acme", Status.FAILED), dead), SettleResult.DEAD_LETTERED, 1.0
        )
    )

    samples = scrape(metrics)

    assert samples.value("atlas_worker_unroutable_total", kind="reply") == 2
    assert samples.value("atlas_worker_unroutable_total", kind="reroute") == 1
    assert samples.value("atlas_worker_dead_letters_total", reason="reply_unroutable") == 1
    assert samples.value("atlas_worker_dead_letters_total", reason="reroute_unroutable") == 1
    assert samples.value("atlas_worker_dead_letters_total", reason="exhausted") == 1
    assert samples.value("atlas_worker_reroutes_total") == 0


def test_breaker_state_is_one_hot_per_tenant_endpoint() -> None:
    metrics = Metrics(CONFIGURED.__contains__)
    endpoint = "https://user:pw@acme-ai.openai.azure.com/openai?api-key=abc"

    metrics.breaker_state("acme", endpoint, "open")
    metrics.breaker_state("acme", endpoint, "half_open")

    samples = scrape(metrics)
    where = "https://acme-ai.openai.azure.com/openai"
    assert samples.value("atlas_worker_breaker_state", tenant="acme", endpoint=where, state="half_open") == 1
    assert samples.value("atlas_worker_breaker_state", tenant="acme", endpoint=where, state="open") == 0
    assert samples.value("atlas_worker_breaker_state", tenant="acme", endpoint=where, state="closed") == 0
    assert "pw@" not in samples.text
    assert "api-key" not in samples.text
    with pytest.raises(ValueError, match="unknown breaker state"):
        metrics.breaker_state("acme", endpoint, "ajar")


def test_two_workers_in_one_process_keep_separate_counts() -> None:
    first, second = Metrics(CONFIGURED.__contains__), Metrics(CONFIGURED.__contains__)
    first.observe(Settled(RequestIds("r", "acme", "rca"), Reply(reply("acme")), SettleResult.REPLIED, 1.0))
    assert scrape(first).value("atlas_worker_settled_total") == 1
    assert scrape(second).value("atlas_worker_settled_total") == 0


@pytest.mark.parametrize(
    ("endpoint", "label"),
    [
        ("http://vllm:8000/v1", "http://vllm:8000/v1"),
        ("https://bedrock-runtime.us-east-1.amazonaws.com", "https://bedrock-runtime.us-east-1.amazonaws.com"),
        ("us-east-1", "us-east-1"),
    ],
)
def test_endpoint_labels_keep_where_but_not_credentials(endpoint: str, label: str) -> None:
    assert endpoint_label(endpoint) == label


# What Prometheus 3 sends: it prefers OpenMetrics, which would change the series scrapers and dashboards read.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


async def test_metrics_are_served_in_the_0_0_4_text_format_whatever_the_scraper_accepts() -> None:
    metrics = Metrics(CONFIGURED.__contains__)
    metrics.observe(Settled(RequestIds("r", "acme", "rca"), Reply(reply("acme")), SettleResult.REPLIED, 10.0))
    server = HealthServer(lambda: {"started": True}, metrics.registry, host="127.0.0.1", port=0)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for accept in (None, PROMETHEUS_ACCEPT):
                headers = {"Accept": accept} if accept else {}
                async with session.get(f"http://127.0.0.1:{server.port}/metrics", headers=headers) as response:
                    assert response.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
                    assert await response.read() == generate_latest(metrics.registry)
    finally:
        await server.stop()

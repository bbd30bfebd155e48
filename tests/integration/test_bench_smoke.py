"""The benchmark harness end to end at its smallest sizes, so it keeps working (no timing is asserted)."""

from pathlib import Path

import pytest

from bench import concurrency, ladder, throughput, tracing_overhead, tracing_sites
from worker.handling.ladder import RetryLadder

pytestmark = pytest.mark.broker


async def test_throughput_harness_races_worker_plain_loops_and_faststream(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    result = await throughput.run(count=100, rounds=1, logs=tmp_path, profile=False, prefetch=16)
    runs = {mode: len(runs) for mode, runs in result.rates.items()}
    assert runs == {"worker": 1, "plain": 1, "faststream": 1, "plain-tuned": 1}
    assert result.ratio("worker", "faststream").n == 1
    assert all(cpu > 0 for runs in result.cpu_ms.values() for cpu in runs)
    worker_log = (tmp_path / "throughput-0-worker.log").read_bytes()
    assert b"request_settled" in worker_log
    assert b"heap_frozen" in worker_log
    assert b'"loop":"uvloop"' in worker_log.replace(b'"loop": "uvloop"', b'"loop":"uvloop"')  # `--loop auto`
    assert b'"provider_ms"' in worker_log  # the worker called the HTTP provider, not an in-process stand-in
    tuned_log = (tmp_path / "throughput-3-plain-tuned.log").read_bytes()
    assert b"heap_frozen" in tuned_log
    assert b"uvloop" in tuned_log


async def test_concurrency_harness_races_worker_and_bare_loop(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    result = await concurrency.run(in_flight=20, provider_s=0.2, waves=2, logs=tmp_path)
    assert {mode: len(runs) for mode, runs in result.rates.items()} == {"worker": 1, "plain": 1}
    assert result.rss("worker").median > 0
    assert result.ratio.n == 1


async def test_ladder_harness_sees_every_level(amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    levels = await ladder.run(RetryLadder(0.1, 2.0, 2), requests=2, logs=tmp_path)
    assert [(lv.level, lv.samples) for lv in levels] == [(0, 2), (1, 2)]


async def test_tracing_harness_runs_before_added_off_and_on(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    result = await tracing_overhead.run(count=100, rounds=1, prefetch=16, logs=tmp_path)
    assert {mode: len(runs) for mode, runs in result.cpu_ms.items()} == {"before": 1, "added": 1, "off": 1, "on": 1}
    assert result.baseline_commit != result.change_commit
    assert result.spans_received > 0  # the traced worker really exported
    assert b"tracing_enabled" in (tmp_path / "tracing-3-on.log").read_bytes()
    assert b"tracing_enabled" not in (tmp_path / "tracing-2-off.log").read_bytes()
    assert b"tracing_enabled" not in (tmp_path / "tracing-1-added.log").read_bytes()
    assert b'"provider_ms"' in (tmp_path / "tracing-3-on.log").read_bytes()  # the deployed worker, over HTTP


async def test_tracing_sites_are_timed_in_the_worker_and_alone(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    ns, calls, messages = await tracing_sites.in_the_worker(50, tmp_path)
    alone_ns, alone_calls = await tracing_sites.one_delivery_in_isolation(20)
    # One consumer span and one settle span a delivery, each entered and left once; one model call.
    assert calls["Tracing.delivery"] == messages
    assert calls["CurrentSpan.__exit__"] == 2 * messages
    assert calls["ModelCallTelemetry.__exit__"] == messages
    assert alone_calls["CurrentSpan.__exit__"] == 2 * 20
    assert all(ns[site] > 0 for site in calls)
    assert alone_ns["Tracing.delivery"] > 0
    table = tracing_sites.show((ns, calls, messages), (alone_ns, alone_calls), 20)
    assert "tracing, all sites (less the GenAI metrics)" in table
    # The timers are gone again: tracing's own methods are back.
    from worker.tracing import Tracing

    assert not hasattr(Tracing.delivery, "__wrapped__")

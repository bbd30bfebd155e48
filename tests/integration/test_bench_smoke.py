"""The benchmark harness end to end at its smallest sizes, so it keeps working (no timing is asserted)."""

from pathlib import Path

import pytest

from bench import ladder, throughput, tracing_overhead
from worker.handling.ladder import RetryLadder

pytestmark = pytest.mark.broker


async def test_throughput_harness_races_worker_and_baseline(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    result = await throughput.run(count=100, rounds=1, prefetch=16, logs=tmp_path, profile=False)
    assert len(result.rates["worker"]) == len(result.rates["baseline"]) == 1
    assert result.ratios.n == 1
    assert b"request_settled" in (tmp_path / "throughput-0-worker.log").read_bytes()


async def test_ladder_harness_sees_every_level(amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    levels = await ladder.run(RetryLadder(0.1, 2.0, 2), requests=2, logs=tmp_path)
    assert [(lv.level, lv.samples) for lv in levels] == [(0, 2), (1, 2)]


async def test_tracing_harness_runs_before_off_and_on(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    result = await tracing_overhead.run(count=100, rounds=1, prefetch=16, logs=tmp_path)
    assert {mode: len(runs) for mode, runs in result.cpu_ms.items()} == {"before": 1, "off": 1, "on": 1}
    assert result.spans_received > 0  # the traced worker really exported
    assert b"tracing_enabled" in (tmp_path / "tracing-2-on.log").read_bytes()
    assert b"tracing_enabled" not in (tmp_path / "tracing-1-off.log").read_bytes()

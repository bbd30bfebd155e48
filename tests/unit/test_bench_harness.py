"""The benchmark harness's arithmetic and its stand-in provider, so `make bench` cannot rot unnoticed."""

import os
import time
from pathlib import Path

import aiohttp
import pytest

from bench import latency
from bench.fake_provider import FixedLatencyServer
from bench.profile import summarise
from bench.stats import alternate, median, pairwise_ratios, percentile, spread, table


def test_median_and_spread_of_odd_and_even_counts() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    s = spread([5.0, 1.0, 3.0])
    assert (s.median, s.low, s.high, s.n) == (3.0, 1.0, 5.0, 3)
    assert s.show() == "3 (1–5)"
    assert spread([7.0]).show("{:.1f}") == "7.0"


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([2.0], 99) == 2.0
    with pytest.raises(ValueError, match="no measurements"):
        percentile([], 50)


def test_runs_alternate_so_neither_side_always_goes_first() -> None:
    assert alternate(["worker", "baseline"], 3) == ["worker", "baseline", "baseline", "worker", "worker", "baseline"]


def test_ratios_pair_each_run_with_its_neighbouring_baseline() -> None:
    assert pairwise_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="one baseline run per"):
        pairwise_ratios([1.0], [])


def test_table_is_markdown_with_aligned_columns() -> None:
    text = table(["a", "bbb"], [["1", "2"], ["333", "4"]])
    assert text.splitlines() == ["| a   | bbb |", "|-----|-----|", "| 1   | 2   |", "| 333 | 4   |"]


def test_profile_summary_attributes_samples_to_buckets_and_modules(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "run (worker/app.py:1);decode (worker/broker/consumer.py:50);model_validate_json "
        "(/v/lib/python3.11/site-packages/pydantic/main.py:3) 3\n"
        "run (worker/app.py:1);settle (worker/broker/settle.py:40);publish "
        "(/v/lib/python3.11/site-packages/aio_pika/exchange.py:9) 1\n"
    )
    profile = summarise(raw)
    assert profile.samples == 4
    assert dict(profile.buckets)["decode + validate request (pydantic)"] == 75.0
    assert dict(profile.by_package)["pydantic"] == 75.0
    assert dict(profile.by_package)["aio_pika"] == 25.0


async def test_fixed_latency_provider_answers_chat_completions_and_records_arrivals() -> None:
    server = FixedLatencyServer(0.01, record=True)
    port = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for content in ("first", "second"):
                body = {"model": "m", "messages": [{"role": "user", "content": content}]}
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
                    assert response.status == 200
                    answer = await response.json()
            assert answer["choices"][0]["message"]["content"]
            server.fail = True
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
                assert response.status == 503
    finally:
        await server.close()
    assert [content for content, _ in server.arrivals] == ["first", "second", "second"]


def test_latency_rounds_record_machine_load_and_preemptions() -> None:
    # A busy loop of ~50 ms raises the machine's busy time; a process that is gone has no preemptions to read.
    before = latency.cpu_jiffies()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = latency.cpu_jiffies()
    assert after[0] > before[0]
    assert after[1] > before[1]
    assert 0.0 < latency.busy_share(before, after) <= 1.0
    assert latency.busy_share(after, after) == 0.0
    assert latency.preemptions(os.getpid()) >= 0
    assert latency.preemptions(2**22 + 1) == 0  # above Linux's largest pid

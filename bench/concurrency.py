"""Benchmark 3: thousands of requests in flight against a slow provider: the worker vs a bare aio-pika + aiohttp
loop at the same concurrency (prefetch = requests in flight, an unlimited aiohttp pool), alternating.

Throughput is compared with the ideal (in flight ÷ provider latency) and with the loop's; peak RSS is each
process's own (the worker runs as `python -m worker run`).
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import amqp_url, namespace, padded_body, start_fake_provider, worker_argv, write_tenant
from bench.stats import Spread, alternate, pairwise_ratios, spread
from bench.throughput import Drain, drain, target_argv
from worker.handling.ladder import RetryLadder

MODES = ("worker", "plain")


@dataclass
class ConcurrencyResult:
    in_flight: int
    provider_s: float
    requests: int
    rates: dict[str, list[float]] = field(default_factory=dict)
    peak_rss_mib: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # CPU per request

    @property
    def ideal(self) -> float:
        return self.in_flight / self.provider_s

    def rate(self, mode: str) -> Spread:
        return spread(self.rates[mode])

    def efficiency(self, mode: str) -> float:
        return self.rate(mode).median / self.ideal

    def rss(self, mode: str) -> Spread:
        return spread(self.peak_rss_mib[mode])

    def cpu(self, mode: str) -> Spread:
        return spread(self.cpu_ms[mode])

    @property
    def ratio(self) -> Spread:
        return spread(pairwise_ratios(self.rates["worker"], self.rates["plain"]))


async def run(in_flight: int, provider_s: float, waves: int, logs: Path, rounds: int = 1) -> ConcurrencyResult:
    count = in_flight * waves
    result = ConcurrencyResult(in_flight, provider_s, count)
    for store in (result.rates, result.peak_rss_mib, result.cpu_ms):
        store.update({mode: [] for mode in MODES})
    ladder = RetryLadder()
    fake, port = await start_fake_provider(logs, f"concurrency-{in_flight}", provider_s)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
            tenants = Path(directory)
            write_tenant(tenants, "t0", base_url, max_concurrency=in_flight, timeout_s=60)
            async with namespace("bench-conc", ladder) as ns:
                for n, mode in enumerate(alternate(MODES, rounds)):
                    if mode == "worker":
                        argv = worker_argv(
                            amqp_url(), ns.topology.namespace, tenants, prefetch=in_flight, ladder=ladder
                        )
                    else:
                        argv = target_argv(mode, ns, in_flight, f"{base_url}/chat/completions")
                    bodies = [(f"{n}-{i}", padded_body("t0", f"conc-{n}-{i}")) for i in range(count)]
                    log = logs / f"concurrency-{in_flight}-{n}-{mode}.log"
                    ready = b"worker_started" if mode == "worker" else b"ready"
                    d = await drain(ns, argv, ready, bodies, log, timeout_s=waves * provider_s * 20 + 60)
                    _record(result, mode, d)
                    print(
                        f"  {in_flight} in flight, run {n + 1}: {mode:7} {result.rates[mode][-1]:6.0f} req/s  "
                        f"peak RSS {d.peak_mib:.0f} MiB  {result.cpu_ms[mode][-1]:.2f} ms CPU/req",
                        flush=True,
                    )
    finally:
        await fake.stop()
    return result


def _record(result: ConcurrencyResult, mode: str, d: Drain) -> None:
    # The first reply cannot come before one provider latency has passed: count that wave in full.
    elapsed = d.arrivals[-1] - d.arrivals[0] + result.provider_s
    result.rates[mode].append(len(d.arrivals) / elapsed)
    result.peak_rss_mib[mode].append(d.peak_mib)
    result.cpu_ms[mode].append(d.cpu_s * 1000 / len(d.arrivals))

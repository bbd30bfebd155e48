"""Benchmark 3: thousands of requests in flight against a slow provider, in one worker process.

Throughput is compared with the ideal (in flight ÷ provider latency); peak RSS is the worker's own (it runs
as `python -m worker run`). The provider listens on several loopback addresses, one per tenant, as many
tenants' endpoints would be: aiohttp's connector allows 256 connections per host.
"""

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    Process,
    amqp_url,
    cpu_seconds,
    incident_body,
    namespace,
    preload,
    rss_kib,
    start_fake_provider,
    worker_argv,
    write_tenant,
)
from worker.handling.ladder import RetryLadder

PER_HOST_CONNECTIONS = 250  # under aiohttp's limit_per_host=256 in the worker's session


@dataclass
class ConcurrencyResult:
    in_flight: int
    provider_s: float
    requests: int
    rate: float
    peak_rss_mib: float
    rss_after_mib: float
    worker_cpu: float  # CPU seconds the worker used per second of the run (1.0 = one core busy)
    cpu_ms_per_request: float

    @property
    def ideal(self) -> float:
        return self.in_flight / self.provider_s

    @property
    def efficiency(self) -> float:
        return self.rate / self.ideal


async def run(
    in_flight: int, provider_s: float, waves: int, logs: Path, per_host: int = PER_HOST_CONNECTIONS
) -> ConcurrencyResult:
    """`per_host`: requests in flight per tenant endpoint (more than 256 queue inside the worker's connector)."""
    tenants_count = max(1, -(-in_flight // per_host))
    hosts = [f"127.0.0.{n + 1}" for n in range(tenants_count)]
    count = in_flight * waves
    ladder = RetryLadder()
    fake, port = await start_fake_provider(logs, "concurrency", provider_s, hosts)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
            tenants = Path(directory)
            per_tenant = in_flight // tenants_count
            for n, host in enumerate(hosts):
                write_tenant(tenants, f"t{n}", f"http://{host}:{port}/v1", max_concurrency=per_tenant, timeout_s=60)
            async with namespace("bench-conc", ladder) as ns:
                replies = await ns.reply_queue()
                bodies = [(str(i), incident_body(f"t{i % tenants_count}", f"conc-{i}")) for i in range(count)]
                await preload(ns, bodies, replies.name)
                arrivals: list[float] = []
                finished = asyncio.Event()

                async def on_reply(message: AbstractIncomingMessage) -> None:
                    arrivals.append(time.perf_counter())
                    if len(arrivals) >= count:
                        finished.set()

                tag = await replies.consume(on_reply, no_ack=True)
                worker = Process(
                    worker_argv(
                        amqp_url(), ns.topology.namespace, tenants, prefetch=tenants_count * per_tenant, ladder=ladder
                    ),
                    logs / "concurrency-worker.log",
                )
                await worker.start()
                try:
                    await worker.ready(b"worker_started")
                    cpu_before, clock_before = cpu_seconds(worker.pid), time.perf_counter()
                    await asyncio.wait_for(finished.wait(), timeout=waves * provider_s * 20 + 60)
                    rss, peak = rss_kib(worker.pid)
                    cpu_used = cpu_seconds(worker.pid) - cpu_before
                    cpu = cpu_used / (time.perf_counter() - clock_before)
                finally:
                    await replies.cancel(tag)
                    await worker.stop()
    finally:
        await fake.stop()
    # The first reply cannot come before one provider latency has passed: count that wave in full.
    elapsed = arrivals[-1] - arrivals[0] + provider_s
    return ConcurrencyResult(
        tenants_count * per_tenant,
        provider_s,
        count,
        count / elapsed,
        peak / 1024,
        rss / 1024,
        cpu,
        cpu_used * 1000 / count,
    )

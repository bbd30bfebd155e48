"""Benchmark 4: scheduled vs actual redelivery delay per retry-ladder level (per-queue TTL delay queues).

A provider that always answers 503 and a `queue_and_retry` tenant: each request climbs every level. The
actual delay of a level is the gap between two consecutive calls of the same request at the provider, so it
includes the worker's settle and the broker's dead-lettering back to `{ns}.requests`, as a tenant sees it.
"""

import asyncio
import itertools
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.common import Process, amqp_url, namespace, request_message, worker_argv, write_tenant
from bench.fake_provider import FixedLatencyServer
from bench.stats import Spread, spread
from contracts import REQUEST_ROUTING_KEY
from worker.handling.ladder import RetryLadder


@dataclass
class LevelResult:
    level: int
    scheduled_s: float
    actual_s: Spread
    samples: int

    @property
    def tolerance_s(self) -> float:
        return max(0.1, 0.05 * self.scheduled_s)

    @property
    def worst_error_s(self) -> float:
        return max(abs(self.actual_s.high - self.scheduled_s), abs(self.actual_s.low - self.scheduled_s))

    @property
    def met(self) -> bool:
        return self.worst_error_s <= self.tolerance_s


async def run(ladder: RetryLadder, requests: int, logs: Path) -> list[LevelResult]:
    fake = FixedLatencyServer(fail=True, record=True)
    port = await fake.start()
    calls = ladder.levels + 1
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
            tenants = Path(directory)
            write_tenant(
                tenants,
                "acme",
                f"http://127.0.0.1:{port}/v1",
                policy="queue_and_retry",
                max_attempts=calls,
                timeout_s=5,
            )
            async with namespace("bench-ladder", ladder) as ns:
                replies = await ns.reply_queue()
                # The provider always fails: keep the circuit closed so every retry reaches it and is timed.
                worker = Process(
                    worker_argv(
                        amqp_url(),
                        ns.topology.namespace,
                        tenants,
                        prefetch=64,
                        ladder=ladder,
                        extra=["--breaker-min-calls", "1000000"],
                    ),
                    logs / "ladder-worker.log",
                )
                await worker.start()
                try:
                    await worker.ready(b"worker_started")
                    for i in range(requests):
                        body = orjson.dumps(
                            {
                                "schema_version": 1,
                                "request_id": f"ladder-{i}",
                                "tenant_id": "acme",
                                "task": "chat",
                                "messages": [{"role": "user", "content": f"ladder-{i}"}],
                            }
                        )
                        await ns.requests.publish(
                            request_message(body, replies.name, f"ladder-{i}"), REQUEST_ROUTING_KEY
                        )
                        await asyncio.sleep(0.01)  # spread them out so they do not expire in lockstep
                    deadline = time.monotonic() + sum(ladder.delays_s) * 2 + 30
                    while len(fake.arrivals) < requests * calls and time.monotonic() < deadline:  # noqa: ASYNC110 (bounded poll)
                        await asyncio.sleep(0.1)
                finally:
                    await worker.stop()
    finally:
        await fake.close()
    by_request: dict[str, list[float]] = defaultdict(list)
    for content, at in fake.arrivals:
        by_request[content].append(at)
    gaps: dict[int, list[float]] = defaultdict(list)
    for times in by_request.values():
        for level, (before, after) in enumerate(itertools.pairwise(times)):
            gaps[level].append(after - before)
    return [
        LevelResult(level, ladder.delays_s[level], spread(gaps[level]), len(gaps[level]))
        for level in range(ladder.levels)
        if gaps[level]
    ]

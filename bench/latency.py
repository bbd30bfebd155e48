"""Benchmark 2: latency the worker adds at a fixed request rate, through an HTTP provider with a fixed latency.

Added latency = reply received − request published − provider latency. The plain loop holding each message
for the same time (no HTTP) runs in alternation as the floor the broker round trips set.

Each round also records how busy the machine's CPUs were and how often the kernel preempted the target: on
a shared two-core machine the tail of a millisecond-scale measure is set by those, not by the code alone.
"""

import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    Namespace,
    Process,
    amqp_url,
    incident_body,
    namespace,
    python,
    request_message,
    start_fake_provider,
    worker_argv,
    write_tenant,
)
from bench.stats import alternate, percentile
from contracts import REQUEST_ROUTING_KEY
from worker.handling.ladder import RetryLadder

MODES = ("worker", "baseline")


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    return percentile(values, 50), percentile(values, 95), percentile(values, 99)


@dataclass
class LatencyResult:
    rate: float
    seconds: float
    provider_latency_s: float
    # per mode, per round: (p50, p95, p99) of added latency in ms
    rounds: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    # worker only, per round: (p50, p95, p99) of the reply's own timings.total_ms − timings.provider_ms
    inside: list[tuple[float, float, float]] = field(default_factory=list)
    # per mode, per round: the share of all CPUs busy (any process) and the target's preemptions per request
    busy: dict[str, list[float]] = field(default_factory=dict)
    preempted: dict[str, list[float]] = field(default_factory=dict)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) time of all CPUs since boot, from /proc/stat (Linux); (0, 0) elsewhere."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0, 0
    values = [int(v) for v in first[1:8]]  # user nice system idle iowait irq softirq
    return sum(values) - values[3] - values[4], sum(values)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def preemptions(pid: int) -> int:
    """How often the kernel took the CPU away from the process while it could still run (all its threads)."""
    count = 0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        count += int(line.split()[1])
    return count


@dataclass
class Round:
    added: list[float]
    inside: list[float]
    busy: float  # share of all CPUs busy while the requests were sent and answered
    preempted: float  # the target's involuntary context switches per request over the same span


async def _one_round(ns: Namespace, target: Process, rate: float, seconds: float, provider_s: float, run: int) -> Round:
    replies = await ns.reply_queue()
    await replies.purge()
    sent: dict[str, float] = {}
    added: list[float] = []
    inside: list[float] = []
    total = int(rate * seconds)
    warm = int(rate)  # the first second warms connections and caches
    finished = asyncio.Event()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        started = sent.get(message.correlation_id or "")
        if started is not None and int((message.correlation_id or "0").rsplit("-", 1)[1]) >= warm:
            added.append((now - started - provider_s) * 1000)
            timings = orjson.loads(message.body).get("timings")
            if timings:
                inside.append(timings["total_ms"] - timings["provider_ms"])
        if len(added) >= total - warm:
            finished.set()

    tag = await replies.consume(on_reply, no_ack=True)
    await target.start()
    await target.ready(b"ready" if "bench.target" in target.argv else b"worker_started")
    body = incident_body("acme", f"lat-{run}")
    jiffies, switches = cpu_jiffies(), preemptions(target.pid)
    loop = asyncio.get_running_loop()
    start = loop.time()
    publishes = []
    for i in range(total):
        # A fixed schedule (open loop): a slow reply must not slow the next request down.
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        correlation_id = f"{run}-{i}"
        sent[correlation_id] = time.perf_counter()
        publishes.append(
            asyncio.ensure_future(
                ns.requests.publish(request_message(body, replies.name, correlation_id), REQUEST_ROUTING_KEY)
            )
        )
    await asyncio.gather(*publishes)
    try:
        await asyncio.wait_for(finished.wait(), 60)
        busy, preempted = busy_share(jiffies, cpu_jiffies()), (preemptions(target.pid) - switches) / total
    finally:
        await replies.cancel(tag)
        await target.stop()
    return Round(added, inside, busy, preempted)


async def run(rate: float, seconds: float, rounds: int, provider_s: float, logs: Path) -> LatencyResult:
    result = LatencyResult(rate, seconds, provider_s, {m: [] for m in MODES}, {m: 0 for m in MODES})
    result.busy, result.preempted = {m: [] for m in MODES}, {m: [] for m in MODES}
    ladder = RetryLadder()
    fake, port = await start_fake_provider(logs, "latency", provider_s)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
            tenants = Path(directory)
            write_tenant(tenants, "acme", f"http://127.0.0.1:{port}/v1", max_concurrency=1024)
            async with namespace("bench-lat", ladder) as ns:
                prefetch = max(64, int(rate * provider_s * 2))  # room for every request in flight
                for n, mode in enumerate(alternate(MODES, rounds)):
                    if mode == "worker":
                        argv = worker_argv(amqp_url(), ns.topology.namespace, tenants, prefetch=prefetch, ladder=ladder)
                    else:
                        argv = [
                            python(),
                            "-m",
                            "bench.target",
                            "baseline",
                            "--amqp-url",
                            amqp_url(),
                            "--namespace",
                            ns.topology.namespace,
                            "--prefetch",
                            str(prefetch),
                            "--delay",
                            f"{provider_s:g}",
                        ]
                    target = Process(argv, logs / f"latency-{n}-{mode}.log")
                    got = await _one_round(ns, target, rate, seconds, provider_s, n)
                    p = _percentiles(got.added)
                    own = ""
                    if got.inside:
                        result.inside.append(_percentiles(got.inside))
                        own = f", inside p99 {result.inside[-1][2]:5.2f}"
                    result.rounds[mode].append(p)
                    result.samples[mode] += len(got.added)
                    result.busy[mode].append(got.busy)
                    result.preempted[mode].append(got.preempted)
                    print(
                        f"  latency run {n + 1}: {mode:8} p50 {p[0]:6.2f} p95 {p[1]:6.2f} p99 {p[2]:6.2f} ms{own}; "
                        f"CPUs {got.busy:4.0%} busy, preempted {got.preempted:.2f}× per request",
                        flush=True,
                    )
    finally:
        await fake.stop()
    return result

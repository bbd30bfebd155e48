"""Benchmark 1: drain throughput of the worker vs a plain aio-pika + aiohttp loop vs a FastStream subscriber.

All of them call the same zero-latency OpenAI-compatible fake (its own process) over HTTP, consume ~4 KB
persistent requests from the same quorum queue with the same prefetch, and publish persistent replies with
publisher confirms. Runs alternate, so each ratio pairs runs that shared the machine's mood.
"""

import asyncio
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    Namespace,
    Process,
    amqp_url,
    namespace,
    padded_body,
    preload,
    python,
    rss_kib,
    start_fake_provider,
    thread_cpu_ns,
    worker_argv,
    write_tenant,
)
from bench.profile import Profile, summarise
from bench.stats import Spread, alternate, pairwise_ratios, spread
from worker.handling.ladder import RetryLadder

CONTENDERS = ("plain", "faststream", "plain-tuned")
LABELS = {
    "plain": "plain aio-pika → aiohttp loop",
    "faststream": "FastStream subscriber + aiohttp",
    "plain-tuned": "plain loop on the worker's runtime (uvloop, GC tuned, heap frozen)",
}
PREFETCH = 200


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class ThroughputResult:
    messages: int
    prefetch: int
    workers: dict[str, list[str]]  # worker variant name → extra `worker run` flags
    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # CPU time of the process per message
    rss_mib: dict[str, list[float]] = field(default_factory=dict)  # peak RSS of the process
    gc_ms: dict[str, list[float]] = field(default_factory=dict)  # workers: CPU in garbage collections per message
    profiles: dict[str, Profile] = field(default_factory=dict)

    def ratio(self, mode: str, against: str) -> Spread:
        return spread(pairwise_ratios(self.rates[mode], self.rates[against]))

    def cpu_ratio(self, mode: str, against: str) -> Spread:
        return spread(pairwise_ratios(self.cpu_ms[mode], self.cpu_ms[against]))

    def rate(self, mode: str) -> Spread:
        return spread(self.rates[mode])

    def cpu(self, mode: str) -> Spread:
        return spread(self.cpu_ms[mode])

    def rss(self, mode: str) -> Spread:
        return spread(self.rss_mib[mode])


def _argv(mode: str, result: ThroughputResult, ns: Namespace, tenants: Path, provider_url: str) -> list[str]:
    if mode in result.workers:
        return worker_argv(
            amqp_url(), ns.topology.namespace, tenants, prefetch=result.prefetch, extra=result.workers[mode]
        )
    return target_argv(mode, ns, result.prefetch, provider_url)


def target_argv(mode: str, ns: Namespace, prefetch: int, provider_url: str) -> list[str]:
    """`python -m bench.target MODE …`: one of the worker's contenders."""
    return [
        python(),
        "-m",
        "bench.target",
        mode,
        "--amqp-url",
        amqp_url(),
        "--namespace",
        ns.topology.namespace,
        "--prefetch",
        str(prefetch),
        "--provider-url",
        provider_url,
    ]


@dataclass
class Drain:
    """What one process did with a preloaded queue: reply arrival times, its CPU seconds from the first tenth of
    the replies to the last (start-up and warm-up excluded, as from the rate), and its peak RSS."""

    arrivals: list[float]
    cpu_s: float
    peak_mib: float
    gc_cpu_ms: float | None = None  # the worker's own count at exit (`gc_summary`), start-up included


async def drain(
    ns: Namespace,
    argv: list[str],
    ready: bytes,
    bodies: Sequence[tuple[str, bytes]],
    log: Path,
    profile_to: Path | None = None,
    timeout_s: float = 120.0,
) -> Drain:
    """Preloads `bodies`, starts the process, and waits for a reply to each."""
    count = len(bodies)
    replies = await ns.reply_queue()
    await replies.purge()
    await preload(ns, bodies, replies.name)
    arrivals: list[float] = []
    finished = asyncio.Event()
    warm = max(1, count // 10)
    cpu_ns: list[int] = []  # at the first tenth of the replies, and at the last

    async def on_reply(message: AbstractIncomingMessage) -> None:
        arrivals.append(time.perf_counter())
        if len(arrivals) in (warm, count):
            cpu_ns.append(thread_cpu_ns(target.pid))
        if len(arrivals) >= count:
            finished.set()

    tag = await replies.consume(on_reply, no_ack=True)
    target = Process(argv, log)
    await target.start()
    spy = None
    try:
        await target.ready(ready)
        if profile_to is not None and (py_spy := _py_spy()):
            spy = await asyncio.create_subprocess_exec(
                *(py_spy, "record", "--pid", str(target.pid), "--format", "raw", "--rate", "250", "--nonblocking"),
                *("--output", str(profile_to)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        await asyncio.wait_for(finished.wait(), timeout=timeout_s)
        cpu = (cpu_ns[-1] - cpu_ns[0]) / 1e9
        peak = rss_kib(target.pid)[1] / 1024
    finally:
        await target.stop()
        await replies.cancel(tag)
        if spy is not None:
            await asyncio.wait_for(spy.wait(), 30)
    return Drain(arrivals, cpu, peak, _gc_cpu_ms(log.read_bytes()[target.started_at_offset :]))


def _gc_cpu_ms(log: bytes) -> float | None:
    for line in reversed(log.splitlines()):
        if b'"gc_summary"' in line:
            return float(orjson.loads(line)["gc_cpu_ms"])
    return None


async def _one_run(
    ns: Namespace, argv: list[str], ready: bytes, count: int, log: Path, run: int, profile_to: Path | None = None
) -> tuple[float, float, float, float | None]:
    """(msg/s after the first tenth, CPU ms per message, peak RSS MiB, GC CPU ms per message) of one drain."""
    bodies = [(f"{run}-{i}", padded_body("acme", f"tp-{run}-{i}")) for i in range(count)]
    d = await drain(ns, argv, ready, bodies, log, profile_to, timeout_s=max(120.0, count / 50))
    warm = max(1, count // 10)  # the first tenth includes process start-up and connection set-up
    gc_ms = d.gc_cpu_ms / count if d.gc_cpu_ms is not None else None
    return (count - warm) / (d.arrivals[-1] - d.arrivals[warm - 1]), d.cpu_s * 1000 / (count - warm), d.peak_mib, gc_ms


def parse_variants(specs: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=FLAGS` (e.g. `gc700=--gc-threshold 700`) → {NAME: [flags]}; none given → the worker as deployed."""
    variants = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        variants[name.strip() or "worker"] = shlex.split(flags)
    return variants or {"worker": []}


async def run(
    count: int,
    rounds: int,
    logs: Path,
    profile: bool,
    *,
    prefetch: int = PREFETCH,
    workers: dict[str, list[str]] | None = None,
    contenders: Sequence[str] = CONTENDERS,
) -> ThroughputResult:
    variants = workers or {"worker": []}
    modes = [*variants, *contenders]
    result = ThroughputResult(count, prefetch, variants)
    for store in (result.rates, result.cpu_ms, result.rss_mib):
        store.update({mode: [] for mode in modes})
    fake, port = await start_fake_provider(logs, "throughput", 0.0)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
            tenants = Path(directory)
            write_tenant(tenants, "acme", base_url, max_concurrency=max(prefetch, 16))
            async with namespace("bench-tp", RetryLadder()) as ns:
                for n, mode in enumerate(alternate(modes, rounds)):
                    argv = _argv(mode, result, ns, tenants, f"{base_url}/chat/completions")
                    ready = b"worker_started" if mode in variants else b"ready"
                    rate, cpu_ms, peak, gc_ms = await _one_run(
                        ns, argv, ready, count, logs / f"throughput-{n}-{mode}.log", n
                    )
                    result.rates[mode].append(rate)
                    result.cpu_ms[mode].append(cpu_ms)
                    result.rss_mib[mode].append(peak)
                    if gc_ms is not None:
                        result.gc_ms.setdefault(mode, []).append(gc_ms)
                    print(
                        f"  throughput run {n + 1}: {mode:10} {rate:7.0f} msg/s  {cpu_ms:.2f} ms CPU/msg  "
                        f"peak RSS {peak:.0f} MiB" + (f"  GC {gc_ms:.3f} ms/msg" if gc_ms is not None else ""),
                        flush=True,
                    )
                if profile:
                    for mode in (next(iter(variants)), contenders[0]) if contenders else (next(iter(variants)),):
                        out = logs / f"{mode}-profile.txt"
                        argv = _argv(mode, result, ns, tenants, f"{base_url}/chat/completions")
                        ready = b"worker_started" if mode in variants else b"ready"
                        await _one_run(ns, argv, ready, count, logs / f"throughput-profile-{mode}.log", 99, out)
                        if out.exists():
                            result.profiles[mode] = summarise(out)
    finally:
        await fake.stop()
    return result

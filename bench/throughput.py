"""Benchmark 1: drain throughput of the worker (instant provider) vs the plain aio-pika loop, alternating."""

import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    Namespace,
    Process,
    amqp_url,
    cpu_seconds,
    incident_body,
    namespace,
    preload,
    python,
    write_tenant,
)
from bench.profile import Profile, summarise
from bench.stats import Spread, alternate, pairwise_ratios, spread
from worker.handling.ladder import RetryLadder

MODES = ("worker", "baseline")


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class ThroughputResult:
    messages: int
    prefetch: int
    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # CPU time of the process per message
    profiles: dict[str, Profile] = field(default_factory=dict)

    @property
    def ratios(self) -> Spread:
        return spread(pairwise_ratios(self.rates["worker"], self.rates["baseline"]))

    def rate(self, mode: str) -> Spread:
        return spread(self.rates[mode])

    def cpu(self, mode: str) -> Spread:
        return spread(self.cpu_ms[mode])


async def _one_run(
    ns: Namespace,
    mode: str,
    count: int,
    prefetch: int,
    tenants: Path,
    logs: Path,
    run: int,
    profile_to: Path | None = None,
) -> tuple[float, float]:
    replies = await ns.reply_queue()
    await replies.purge()
    bodies = [(f"{run}-{i}", incident_body("acme", f"tp-{run}-{i}")) for i in range(count)]
    await preload(ns, bodies, replies.name)
    arrivals: list[float] = []
    finished = asyncio.Event()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        arrivals.append(time.perf_counter())
        if len(arrivals) >= count:
            finished.set()

    tag = await replies.consume(on_reply, no_ack=True)
    target = Process(
        [
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
            "--tenants",
            str(tenants),
        ],
        logs / f"throughput-{run}-{mode}.log",
    )
    await target.start()
    spy = None
    try:
        await target.ready(b"ready")
        cpu_before = cpu_seconds(target.pid)
        if profile_to is not None and (py_spy := _py_spy()):
            spy = await asyncio.create_subprocess_exec(
                py_spy,
                "record",
                "--pid",
                str(target.pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--output",
                str(profile_to),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        await asyncio.wait_for(finished.wait(), timeout=max(120.0, count / 50))
        cpu = cpu_seconds(target.pid) - cpu_before
    finally:
        await target.stop()
        await replies.cancel(tag)
        if spy is not None:
            await asyncio.wait_for(spy.wait(), 30)
    warm = count // 10  # the first tenth includes process start-up and connection set-up
    return (count - warm) / (arrivals[-1] - arrivals[warm - 1]), cpu * 1000 / count


async def run(count: int, rounds: int, prefetch: int, logs: Path, profile: bool) -> ThroughputResult:
    result = ThroughputResult(count, prefetch, {mode: [] for mode in MODES}, {mode: [] for mode in MODES})
    ladder = RetryLadder()
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
        tenants = Path(directory)
        # The provider is replaced in-process; the URL is never called.
        write_tenant(tenants, "acme", "http://127.0.0.1:9/v1", max_concurrency=max(prefetch, 16))
        async with namespace("bench-tp", ladder) as ns:
            for n, mode in enumerate(alternate(MODES, rounds)):
                rate, cpu_ms = await _one_run(ns, mode, count, prefetch, tenants, logs, n)
                result.rates[mode].append(rate)
                result.cpu_ms[mode].append(cpu_ms)
                print(f"  throughput run {n + 1}: {mode:8} {rate:7.0f} msg/s  {cpu_ms:.2f} ms CPU/msg", flush=True)
            if profile:
                for mode in MODES:
                    out = logs / f"{mode}-profile.txt"
                    await _one_run(ns, mode, count, prefetch, tenants, logs, 99, profile_to=out)
                    if out.exists():
                        result.profiles[mode] = summarise(out)
    return result

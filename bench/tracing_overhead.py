"""Benchmark 6: worker CPU per message before tracing existed, with tracing off, and tracing every request."""

import asyncio
import contextlib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from bench.common import ROOT, Namespace, Process, amqp_url, cpu_seconds, incident_body, namespace, preload, python
from bench.common import write_tenant as write_bench_tenant
from bench.stats import Spread, alternate, pairwise_ratios, spread
from worker.handling.ladder import RetryLadder

MODES = ("before", "off", "on")


@dataclass
class TracingResult:
    messages: int
    baseline_commit: str
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {mode: [] for mode in MODES})
    spans_received: int = 0

    def cpu(self, mode: str) -> Spread:
        return spread(self.cpu_ms[mode])

    def ratio(self, mode: str, baseline: str = "before") -> Spread:
        """Per pair of runs; tracing on ÷ off is what tracing itself costs, as both run exactly this code
        (the code before tracing also lacks everything merged after it)."""
        return spread(pairwise_ratios(self.cpu_ms[mode], self.cpu_ms[baseline]))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def checkout_before_tracing() -> Iterator[tuple[Path, str]]:
    """A temporary worktree of the code "before this change": the newest commit in HEAD's history without
    worker/tracing.py (on a branch, the main it last merged; on main, the tip before tracing was merged)."""
    # First parents only: a merged branch's older commits without tracing are not "before this change".
    candidates = _git("rev-list", "--first-parent", "--max-count=500", "HEAD").split()
    before = next((c for c in candidates if not _git("ls-tree", "--name-only", c, "worker/tracing.py")), None)
    if before is None:
        raise RuntimeError("no commit without worker/tracing.py in the last 500 (a shallow clone?)")
    before = _git("rev-parse", "--short", before)
    with tempfile.TemporaryDirectory(prefix="bench-before-tracing-") as directory:
        path = Path(directory) / "checkout"
        _git("worktree", "add", "--detach", str(path), before)
        try:
            yield path, before
        finally:
            _git("worktree", "remove", "--force", str(path))


@contextlib.asynccontextmanager
async def otlp_sink() -> AsyncIterator[tuple[str, list[int]]]:
    """Accepts OTLP/HTTP exports and counts their bytes, so tracing-on pays for encoding and sending."""
    received: list[int] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.Response(content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def _one_run(ns: Namespace, target: Process, count: int, run: int) -> float:
    replies = await ns.reply_queue()
    await replies.purge()
    bodies = [(f"{run}-{i}", incident_body("acme", f"tr-{run}-{i}")) for i in range(count)]
    await preload(ns, bodies, replies.name)
    arrived = 0
    finished = asyncio.Event()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        nonlocal arrived
        arrived += 1
        if arrived >= count:
            finished.set()

    tag = await replies.consume(on_reply, no_ack=True)
    await target.start()
    try:
        await target.ready(b"ready")
        cpu_before = cpu_seconds(target.pid)
        await asyncio.wait_for(finished.wait(), timeout=max(120.0, count / 50))
        cpu = cpu_seconds(target.pid) - cpu_before
    finally:
        await target.stop()
        await replies.cancel(tag)
    return cpu * 1000 / count


async def run(count: int, rounds: int, prefetch: int, logs: Path) -> TracingResult:
    ladder = RetryLadder()
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory, checkout_before_tracing() as old:
        tenants = Path(directory)
        write_bench_tenant(tenants, "acme", "http://127.0.0.1:9/v1", max_concurrency=max(prefetch, 16))
        old_path, old_commit = old
        result = TracingResult(count, old_commit)
        async with namespace("bench-tr", ladder) as ns, otlp_sink() as (endpoint, received):
            argv = [python(), "-m", "bench.target", "worker", "--amqp-url", amqp_url()]
            argv += ["--namespace", ns.topology.namespace, "--prefetch", str(prefetch), "--tenants", str(tenants)]
            tracing_on = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
            targets = {
                "before": lambda log: Process(argv, log, cwd=old_path),
                "off": lambda log: Process(argv, log, env={"OTEL_SDK_DISABLED": "true"}),
                "on": lambda log: Process(argv, log, env=tracing_on),
            }
            for n, mode in enumerate(alternate(MODES, rounds)):
                started = time.perf_counter()
                cpu_ms = await _one_run(ns, targets[mode](logs / f"tracing-{n}-{mode}.log"), count, n)
                result.cpu_ms[mode].append(cpu_ms)
                print(
                    f"  tracing run {n + 1}: {mode:6} {cpu_ms:.3f} ms CPU/msg ({time.perf_counter() - started:.0f} s)"
                )
            result.spans_received = len(received)
    return result

"""Benchmark 6: what tracing costs per message: the change with tracing off, and tracing every request today."""

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

# before: the commit just before tracing was merged; added: the merge itself, tracing off (together: what the change
# cost when off, with nothing else between them); off and on: this code, without and with every request traced.
MODES = ("before", "added", "off", "on")


@dataclass
class TracingResult:
    messages: int
    baseline_commit: str
    change_commit: str
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {mode: [] for mode in MODES})
    spans_received: int = 0

    def cpu(self, mode: str) -> Spread:
        return spread(self.cpu_ms[mode])

    def ratio(self, mode: str, baseline: str = "before") -> Spread:
        """Per pair of runs. Each ratio compares one code base with itself: `added` ÷ `before` is the change
        alone, `on` ÷ `off` is tracing on today's code (which has much more than the code before tracing)."""
        return spread(pairwise_ratios(self.cpu_ms[mode], self.cpu_ms[baseline]))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def tracing_change() -> tuple[str, str]:
    """The commit that brought tracing in (the newest first-parent commit of HEAD with worker/tracing.py whose
    first parent has none) and that parent: "before this change" and the change, with nothing else between."""
    # First parents only: a merged branch's older commits without tracing are not "before this change".
    candidates = _git("rev-list", "--first-parent", "--max-count=500", "HEAD").split()
    index = next((i for i, c in enumerate(candidates) if not _git("ls-tree", "--name-only", c, "worker/tracing.py")), 0)
    if index == 0:
        raise RuntimeError("no commit with and before worker/tracing.py in the last 500 (a shallow clone?)")
    return _git("rev-parse", "--short", candidates[index]), _git("rev-parse", "--short", candidates[index - 1])


@contextlib.contextmanager
def checkouts(*commits: str) -> Iterator[list[Path]]:
    """Temporary worktrees of these commits, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-tracing-change-") as directory:
        paths = [Path(directory) / commit for commit in commits]
        try:
            for path, commit in zip(paths, commits, strict=True):
                _git("worktree", "add", "--detach", str(path), commit)
            yield paths
        finally:
            for path in paths:
                if path.exists():
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
    before_commit, change_commit = tracing_change()
    with (
        tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory,
        checkouts(before_commit, change_commit) as (before_path, change_path),
    ):
        tenants = Path(directory)
        write_bench_tenant(tenants, "acme", "http://127.0.0.1:9/v1", max_concurrency=max(prefetch, 16))
        result = TracingResult(count, before_commit, change_commit)
        async with namespace("bench-tr", ladder) as ns, otlp_sink() as (endpoint, received):
            argv = [python(), "-m", "bench.target", "worker", "--amqp-url", amqp_url()]
            argv += ["--namespace", ns.topology.namespace, "--prefetch", str(prefetch), "--tenants", str(tenants)]
            off = {"OTEL_SDK_DISABLED": "true"}
            tracing_on = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
            targets = {
                "before": lambda log: Process(argv, log, cwd=before_path),
                "added": lambda log: Process(argv, log, env=off, cwd=change_path),
                "off": lambda log: Process(argv, log, env=off),
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

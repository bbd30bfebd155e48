"""Benchmark 6: what tracing costs per message: the change with tracing off, and tracing every request today.

`python -m bench.tracing_overhead [--modes before,added] [--rounds N] [--messages N] [--side-by-side]
[--provider http|instant]` runs it alone, e.g. many rounds of two builds, draining one queue together, to judge
a 1 % difference.
"""

import argparse
import asyncio
import contextlib
import random
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from bench.common import (
    ROOT,
    Namespace,
    Process,
    amqp_url,
    incident_body,
    namespace,
    preload,
    python,
    start_fake_provider,
    thread_cpu_ns,
    worker_argv,
)
from bench.common import write_tenant as write_bench_tenant
from bench.stats import Spread, alternate, median, pairwise_ratios, spread
from worker.handling.ladder import RetryLadder

# before: the commit just before tracing was merged; added: the merge itself, tracing off (together: what the change
# cost when off, with nothing else between them); off and on: this code, without and with every request traced.
MODES = ("before", "added", "off", "on")
# Not in the default run: tracing on with every span dropped by the sampler (only the context propagated).
EXTRA_MODES = ("dropped",)
# http: the worker as deployed (`python -m worker run`) calling `bench/fake_provider.py` over HTTP, as every request
# it handles does; instant: `python -m bench.target worker`, the worker in-process with a provider that answers
# without any I/O, so the denominator is the worker's own work alone (a stricter ratio than any deployment sees).
PROVIDERS = ("http", "instant")
# CPU is counted from this share of the replies on: start-up (connections, first calls, the prefetch filling) varies
# more from run to run than the steady drain that follows.
WARM_UP: Final = 0.1


@dataclass
class TracingResult:
    messages: int
    baseline_commit: str
    change_commit: str
    modes: tuple[str, ...] = MODES
    provider: str = "http"
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    exports_received: int = 0
    spans_received: int = 0

    def __post_init__(self) -> None:
        self.cpu_ms = {mode: [] for mode in self.modes}

    def cpu(self, mode: str) -> Spread:
        return spread(self.cpu_ms[mode])

    def ratio(self, mode: str, baseline: str = "before") -> Spread:
        """Per pair of runs. Each ratio compares one code base with itself: `added` ÷ `before` is the change
        alone, `on` ÷ `off` is tracing on today's code (which has much more than the code before tracing)."""
        return spread(pairwise_ratios(self.cpu_ms[mode], self.cpu_ms[baseline]))

    def interval(self, mode: str, baseline: str = "before") -> tuple[float, float]:
        """A 95 % confidence interval of the median pairwise ratio (bootstrap, fixed seed): with it, a 1 %
        target can be called met, missed, or not decidable from these runs."""
        return bootstrap_median(pairwise_ratios(self.cpu_ms[mode], self.cpu_ms[baseline]))


def bootstrap_median(values: list[float], resamples: int = 4000) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    rng = random.Random(0)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


TRACING_PATHS = ("worker/tracing.py", "worker/tracing/__init__.py")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def tracing_change() -> tuple[str, str]:
    """The commit that brought tracing in (the newest first-parent commit of HEAD with the tracing module, once
    `worker/tracing.py`, now `worker/tracing/__init__.py`, whose first parent has neither) and that parent:
    "before this change" and the change, with nothing else between."""
    # First parents only: a merged branch's older commits without tracing are not "before this change".
    candidates = _git("rev-list", "--first-parent", "--max-count=500", "HEAD").split()
    index = next((i for i, c in enumerate(candidates) if not _git("ls-tree", "--name-only", c, *TRACING_PATHS)), 0)
    if index == 0:
        raise RuntimeError("no commit with and before the tracing module in the last 500 (a shallow clone?)")
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
async def otlp_sink() -> AsyncIterator[tuple[str, list[bytes]]]:
    """Accepts OTLP/HTTP exports and keeps them (decoded only after the runs), so tracing-on pays for encoding and
    sending and the benchmark can check that every span arrived."""
    received: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(await request.read())
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


@contextlib.asynccontextmanager
async def fake_provider(logs: Path, provider: str) -> AsyncIterator[str]:
    """The tenant's base URL: `bench/fake_provider.py` answering at once in its own process (http), or an address
    nothing is asked at (instant: `bench.target worker` never calls its provider over the network)."""
    if provider == "instant":
        yield "http://127.0.0.1:9/v1"
        return
    fake, port = await start_fake_provider(logs, "tracing", 0.0)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await fake.stop()


async def drain_alone(ns: Namespace, target: Process, ready: bytes, count: int, run: int) -> float:
    """`target` drains `count` preloaded requests on its own; its CPU per message after the warm-up, in ms."""
    replies = await ns.reply_queue()
    await replies.purge()
    bodies = [(f"{run}-{i}", incident_body("acme", f"tr-{run}-{i}")) for i in range(count)]
    await preload(ns, bodies, replies.name)
    arrived = 0
    warm = max(1, int(count * WARM_UP))
    cpu_at_warm = 0
    finished = asyncio.Event()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        nonlocal arrived, cpu_at_warm
        arrived += 1
        if arrived == warm:
            cpu_at_warm = thread_cpu_ns(target.pid)
        if arrived >= count:
            finished.set()

    tag = await replies.consume(on_reply, no_ack=True)
    await target.start()
    try:
        await target.ready(ready)
        await asyncio.wait_for(finished.wait(), timeout=max(120.0, count / 50))
        cpu_ns = thread_cpu_ns(target.pid) - cpu_at_warm
    finally:
        await target.stop()
        await replies.cancel(tag)
    return cpu_ns / 1e6 / max(1, count - warm)


def settled(target: Process) -> int:
    """Requests this start of the worker has settled so far, from its log lines."""
    return target.log_path.read_bytes()[target.started_at_offset :].count(b'"request_settled"')


async def _side_by_side_run(ns: Namespace, targets: list[Process], ready: bytes, count: int, run: int) -> list[float]:
    """Two workers drain one queue at the same time, so both meet the same machine from moment to moment;
    each one's CPU per message over the same window (after the warm-up) is its CPU ÷ the requests it settled."""
    replies = await ns.reply_queue()
    await replies.purge()
    bodies = [(f"{run}-{i}", incident_body("acme", f"tr-{run}-{i}")) for i in range(count)]
    arrived = 0
    warm = max(1, int(count * WARM_UP))
    at_warm: list[tuple[int, int]] = []
    finished = asyncio.Event()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == warm:
            at_warm.extend((thread_cpu_ns(t.pid), settled(t)) for t in targets)
        if arrived >= count:
            finished.set()

    tag = await replies.consume(on_reply, no_ack=True)
    try:
        for target in targets:
            await target.start()
        for target in targets:
            await target.ready(ready)
        # Published only once both consume, so neither gets a head start (the broker deals deliveries in turn).
        await preload(ns, bodies, replies.name)
        await asyncio.wait_for(finished.wait(), timeout=max(120.0, count / 50))
        await asyncio.sleep(0.2)  # the last settles' log lines
        ends = [(thread_cpu_ns(t.pid), settled(t)) for t in targets]
    finally:
        for target in targets:
            await target.stop()
        await replies.cancel(tag)
    return [(cpu - cpu0) / 1e6 / max(1, n - n0) for (cpu0, n0), (cpu, n) in zip(at_warm, ends, strict=True)]


def count_spans(exports: list[bytes]) -> int:
    """Spans in the received exports, decoded with opentelemetry-proto (0 where it is not installed)."""
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    except ImportError:
        return 0
    requests = (ExportTraceServiceRequest.FromString(body) for body in exports)
    return sum(len(scope.spans) for r in requests for resource in r.resource_spans for scope in resource.scope_spans)


async def run(
    count: int,
    rounds: int,
    prefetch: int,
    logs: Path,
    modes: tuple[str, ...] = MODES,
    side_by_side: bool = False,
    provider: str = "http",
) -> TracingResult:
    """Each round runs every mode once (the order reversed every other round); all runs of a round share one
    PYTHONHASHSEED, so a pair differs in its code alone, not in how its dicts happen to be laid out. Side by
    side, a round's workers drain one queue of `count` requests each together instead of one after another.
    `provider` is one of PROVIDERS."""
    ladder = RetryLadder()
    before_commit, change_commit = tracing_change()
    with (
        tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory,
        checkouts(before_commit, change_commit) as (before_path, change_path),
    ):
        tenants = Path(directory)
        result = TracingResult(count, before_commit, change_commit, modes, provider)
        async with (
            namespace("bench-tr", ladder) as ns,
            otlp_sink() as (endpoint, received),
            fake_provider(logs, provider) as base_url,
        ):
            write_bench_tenant(tenants, "acme", base_url, max_concurrency=max(prefetch, 16))
            if provider == "http":
                argv, ready = (
                    worker_argv(amqp_url(), ns.topology.namespace, tenants, prefetch=prefetch),
                    b"worker_started",
                )
            else:
                argv = [python(), "-m", "bench.target", "worker", "--amqp-url", amqp_url(), "--namespace"]
                argv += [ns.topology.namespace, "--prefetch", str(prefetch), "--tenants", str(tenants)]
                ready = b"ready"
            off = {"OTEL_SDK_DISABLED": "true"}
            tracing_on = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
            envs: dict[str, tuple[dict[str, str], Path]] = {
                "before": ({}, before_path),
                "added": (off, change_path),
                "off": (off, ROOT),
                "on": (tracing_on, ROOT),
                "dropped": ({**tracing_on, "OTEL_TRACES_SAMPLER": "always_off"}, ROOT),
            }

            def target(mode: str, n: int, seed: int) -> Process:
                env, cwd = envs[mode]
                return Process(
                    argv, logs / f"tracing-{n}-{mode}.log", env={**env, "PYTHONHASHSEED": str(seed)}, cwd=cwd
                )

            if side_by_side:
                for n in range(rounds):
                    started = time.perf_counter()
                    order = list(modes) if n % 2 == 0 else list(reversed(modes))  # which one starts first
                    targets = [target(m, n, n + 1) for m in order]
                    cpus = await _side_by_side_run(ns, targets, ready, count * len(modes), n)
                    for mode, cpu_ms in zip(order, cpus, strict=True):
                        result.cpu_ms[mode].append(cpu_ms)
                    shown = ", ".join(f"{m} {c:.3f}" for m, c in zip(order, cpus, strict=True))
                    took = time.perf_counter() - started
                    print(f"  tracing round {n + 1} side by side: {shown} ms CPU/msg ({took:.0f} s)")
            for n, mode in enumerate([] if side_by_side else alternate(modes, rounds)):
                started = time.perf_counter()
                cpu_ms = await drain_alone(ns, target(mode, n, n // len(modes) + 1), ready, count, n)
                result.cpu_ms[mode].append(cpu_ms)
                print(
                    f"  tracing run {n + 1}: {mode:6} {cpu_ms:.3f} ms CPU/msg ({time.perf_counter() - started:.0f} s)"
                )
            result.exports_received = len(received)
            result.spans_received = count_spans(received)
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_overhead", description=__doc__)
    parser.add_argument("--modes", default=",".join(MODES), help=f"a subset of {','.join(MODES)}, in run order")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--logs", type=Path, default=None, help="keep each worker's log here")
    parser.add_argument("--side-by-side", action="store_true", help="a round's workers drain one queue together")
    parser.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="http",
        help="http: the deployed worker calling a fake over HTTP (default); instant: a provider with no I/O",
    )
    args = parser.parse_args()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not set(modes) <= set(MODES + EXTRA_MODES) or not modes:
        parser.error(f"--modes: choose from {','.join(MODES + EXTRA_MODES)}")
    with tempfile.TemporaryDirectory(prefix="bench-tracing-logs-") as directory:
        logs = args.logs or Path(directory)
        logs.mkdir(parents=True, exist_ok=True)
        r = asyncio.run(run(args.messages, args.rounds, 64, logs, modes, args.side_by_side, args.provider))
    for mode in modes:
        print(f"{mode:7} {r.cpu(mode).show('{:.4f} ms')} CPU per message")
    for mode, baseline in (("added", "before"), ("on", "off"), ("dropped", "off")):
        if mode in modes and baseline in modes:
            low, high = r.interval(mode, baseline)
            shown = r.ratio(mode, baseline).show("{:.4f}×")
            print(f"{mode} / {baseline}: {shown}; median's 95 % interval {low:.4f}–{high:.4f}×")
    if "on" in modes:
        print(f"spans received: {r.spans_received} in {r.exports_received} exports")


if __name__ == "__main__":
    cli()

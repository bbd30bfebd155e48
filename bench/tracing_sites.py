"""Where tracing's CPU goes: each tracing call site's thread CPU time per message, in the running worker and alone.

`python -m bench.tracing_sites [--messages N]` drains N requests through the worker as deployed (`python -m worker
run`, the HTTP fake provider), every request traced and exported over OTLP/HTTP to a local sink, with the worker's
tracing entry points wrapped in timers of thread CPU time (only the outermost call is timed, so nothing counts
twice). It then makes the same calls for one delivery in a loop in this process, and prints both per message: the
same code, in a process busy with everything else a delivery does, and on its own with every cache warm.
"""

import argparse
import asyncio
import atexit
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Final

import orjson

from bench.common import Process, amqp_url, namespace, python, worker_argv
from bench.common import write_tenant as write_bench_tenant
from bench.stats import table
from bench.tracing_overhead import drain_alone, fake_provider, otlp_sink

REPORT: Final = "tracing_sites"
# (class path, method) of every place the worker enters tracing code on a delivery's way, in its order.
SITES: Final = (
    ("worker.tracing:Tracing", "delivery"),
    ("worker.tracing.spans:CurrentSpan", "__enter__"),
    ("worker.tracing:Tracing", "annotate_delivery"),
    ("worker.tracing:ModelCallTelemetry", "__enter__"),
    ("worker.tracing:ModelCallTelemetry", "__exit__"),
    ("worker.tracing:Tracing", "policy_decided"),
    ("worker.tracing:Tracing", "span"),
    ("worker.tracing:Tracing", "publish"),
    ("worker.tracing:Tracing", "annotate"),
    ("worker.tracing.spans:CurrentSpan", "__exit__"),
    ("worker.tracing.otlp_encoding", "encode_request"),
    # Runs with tracing off too (inside ModelCallTelemetry.__exit__): timed on its own, to be taken out.
    ("worker.ops.genai_metrics:GenAIMetrics", "observe"),
)
NESTED_TOO: Final = {"observe"}
WARM_UP_DELIVERIES: Final = 2000


class SiteTimers:
    """Thread CPU time spent in each site, outermost calls only."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        nested_too = name.rsplit(".", 1)[-1] in NESTED_TOO

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth and not nested_too:
                return method(*args, **kwargs)
            self._depth += 1
            started = time.thread_time_ns()
            try:
                return method(*args, **kwargs)
            finally:
                self.ns[name] = self.ns.get(name, 0) + time.thread_time_ns() - started
                self.calls[name] = self.calls.get(name, 0) + 1
                self._depth -= 1

        return timed

    def install(self) -> Callable[[], None]:
        """Wrap every site; returns what puts the originals back."""
        import importlib

        import worker.tracing.otlp_export as export

        originals: list[tuple[Any, str, Any]] = []
        for target, method in SITES:
            module_name, _, class_name = target.partition(":")
            owner: Any = importlib.import_module(module_name)
            if class_name:
                owner = getattr(owner, class_name)
            name = f"{class_name or module_name.rsplit('.', 1)[-1]}.{method}"
            original = getattr(owner, method)
            wrapped = self.wrap(name, original)
            owners = [owner] if class_name else [owner, export]  # a module function: also where it is imported
            for each in owners:
                originals.append((each, method, getattr(each, method)))
                setattr(each, method, wrapped)

        def uninstall() -> None:
            for owner, method, original in reversed(originals):
                setattr(owner, method, original)

        return uninstall


def run_instrumented_worker(argv: list[str]) -> int:
    """`python -m worker …` with the sites timed; their totals are logged as one JSON line at exit."""
    timers = SiteTimers()
    timers.install()

    def report() -> None:
        line = orjson.dumps({"event": REPORT, "ns": timers.ns, "calls": timers.calls}).decode()
        print(line, file=sys.stderr, flush=True)

    atexit.register(report)
    from worker.cli import main

    return main(argv)


async def one_delivery_in_isolation(messages: int) -> tuple[dict[str, int], dict[str, int]]:
    """The tracing calls of one successful delivery, made `messages` times in a loop with the sites timed; the
    spans are posted to a local sink only after the loop (the loop never yields, so no export runs inside it)."""
    from prometheus_client import CollectorRegistry

    from worker.handling.outcome import RequestIds
    from worker.ops.genai_metrics import GenAIMetrics
    from worker.providers.base import Finish, ModelCall, ModelResult, Turn
    from worker.tracing import tracing_from_env

    class Delivery:
        headers: ClassVar = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        body = b"x" * 2048
        message_id = "tr-1-0"
        correlation_id = "tr-1-0"

    class Tenant:
        kind = "openai_compatible"
        endpoint = "http://127.0.0.1:8000/v1"
        model = "bench-model"

    ids = RequestIds("tr-1-0", "acme", "summary")
    call = ModelCall("You are an SRE.", (Turn("user", "incident"),), max_output_tokens=512, timeout_s=30.0)
    result = ModelResult("answer", Finish.STOP, input_tokens=612, output_tokens=31, model="bench-model")
    async with otlp_sink() as (endpoint, _received):
        # The Delivery's traceparent is sampled, so the default sampler (parent-based) records every span.
        environ = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_MAX_QUEUE_SIZE": str(4 * (messages + WARM_UP_DELIVERIES)),
        }
        tracing = tracing_from_env(GenAIMetrics(CollectorRegistry()), environ)

        def one() -> None:
            with tracing.delivery(Delivery, "bench.requests"):  # type: ignore[arg-type]
                tracing.annotate_delivery(ids, 1)
                with tracing.model_call(Tenant, call) as telemetry:
                    telemetry.answered(result)
                with tracing.span("settle", {"atlas.settle.step": "reply"}):
                    with tracing.publish("", "bench.replies", {}, Delivery.headers):
                        pass
                    tracing.annotate({"atlas.settle.result": "replied"})

        for _ in range(WARM_UP_DELIVERIES):
            one()
        timers = SiteTimers()
        uninstall = timers.install()
        try:
            for _ in range(messages):
                one()
            await asyncio.to_thread(tracing.shutdown)  # every span encoded and posted to the sink
        finally:
            uninstall()
    return timers.ns, timers.calls


async def in_the_worker(messages: int, logs: Path) -> tuple[dict[str, int], dict[str, int], int]:
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
        tenants = Path(directory)
        async with (
            namespace("bench-ts") as ns,
            otlp_sink() as (endpoint, _received),
            fake_provider(logs, "http") as base_url,
        ):
            write_bench_tenant(tenants, "acme", base_url, max_concurrency=64)
            argv = worker_argv(amqp_url(), ns.topology.namespace, tenants, prefetch=64)
            argv = [python(), "-m", "bench.tracing_sites", "worker", *argv[3:]]  # `-m worker` → this module
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
            target = Process(argv, logs / "tracing-sites-worker.log", env=env)
            await drain_alone(ns, target, b"worker_started", messages, 0)
    for line in reversed(target.log_path.read_text().splitlines()):
        if REPORT in line:
            report = orjson.loads(line)
            return report["ns"], report["calls"], messages
    raise RuntimeError(f"the worker logged no {REPORT} line; see {target.log_path}")


def show(
    worker: tuple[dict[str, int], dict[str, int], int], alone: tuple[dict[str, int], dict[str, int]], n: int
) -> str:
    worker_ns, worker_calls, worker_messages = worker
    alone_ns, _ = alone
    rows = []
    total_worker = total_alone = 0.0
    for name in dict.fromkeys([*worker_ns, *alone_ns]):
        in_worker = worker_ns.get(name, 0) / 1e3 / worker_messages
        isolated = alone_ns.get(name, 0) / 1e3 / n
        if not name.endswith(".observe"):
            total_worker += in_worker
            total_alone += isolated
        ratio = f"{in_worker / isolated:.1f}×" if isolated else "—"
        calls = worker_calls.get(name, 0) / worker_messages
        rows.append([name, f"{calls:.2f}", f"{in_worker:.1f}", f"{isolated:.1f}", ratio])
    observe = worker_ns.get("GenAIMetrics.observe", 0) / 1e3 / worker_messages
    observe_alone = alone_ns.get("GenAIMetrics.observe", 0) / 1e3 / n
    total_worker -= observe  # inside ModelCallTelemetry.__exit__, and paid with tracing off as well
    total_alone -= observe_alone
    rows.append(["tracing, all sites (less the GenAI metrics)", "", f"{total_worker:.1f}", f"{total_alone:.1f}", ""])
    header = ["site", "calls per message", "µs per message, in the worker", "µs per message, alone", "worker ÷ alone"]
    return table(header, rows)


def cli() -> None:
    if sys.argv[1:2] == ["worker"]:
        sys.exit(run_instrumented_worker(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_sites", description=__doc__)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--logs", type=Path, default=None, help="keep the worker's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tracing-sites-") as directory:
        logs = args.logs or Path(directory)
        logs.mkdir(parents=True, exist_ok=True)
        worker = asyncio.run(in_the_worker(args.messages, logs))
    alone = asyncio.run(one_delivery_in_isolation(args.messages))
    print(show(worker, alone, args.messages))


if __name__ == "__main__":
    cli()

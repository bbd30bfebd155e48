"""The process's runtime: which event loop runs the worker, and how the garbage collector is tuned."""

import asyncio
import gc
import importlib.util
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import structlog

log = structlog.get_logger("worker.runtime")

LoopName = Literal["auto", "asyncio", "uvloop"]
LOOPS: tuple[LoopName, ...] = ("auto", "asyncio", "uvloop")
# CPython's default first-generation threshold is 700 allocations. With hundreds of deliveries alive, each
# collection walks all of their objects; measured in docs/PERFORMANCE.md, 50,000 costs the least CPU per
# message at a flat RSS.
DEFAULT_GC_THRESHOLD = 50_000
T = TypeVar("T")
# What `run` chose, reported once the worker has started: a start that fails prints its one error line only.
_chosen: dict[str, str] = {}


def env_loop() -> str:
    return os.environ.get("ATLAS_EVENT_LOOP", "auto")


def env_gc_threshold() -> str:
    """As text: the flag's parser checks it like a typed value, so a bad variable is a usage error."""
    return os.environ.get("ATLAS_GC_THRESHOLD", str(DEFAULT_GC_THRESHOLD))


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(name: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(the loop's name, a factory for it); `auto` is uvloop when it is installed, else asyncio's own."""
    if name not in LOOPS:
        raise ValueError(f"unknown event loop {name!r}; choose one of {', '.join(LOOPS)}")
    if name == "uvloop" or (name == "auto" and uvloop_available()):
        import uvloop  # an ImportError here is the operator's explicit `--loop uvloop` on a platform without it

        return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def tune_gc(threshold: int) -> None:
    """A larger first generation: collections run less often while the many live deliveries are walked."""
    if threshold < 0:
        raise ValueError("the gc threshold cannot be negative")
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)


def freeze_heap() -> None:  # from a running loop
    """Moves everything alive at start-up (modules, models, schemas, settings) out of the collector's sight,
    once, so later collections walk only what requests allocate."""
    gc.collect()  # garbage from start-up is freed now rather than frozen forever
    gc.freeze()
    _chosen["frozen"] = "yes"
    log.info(
        "heap_frozen",
        objects=gc.get_freeze_count(),
        gc_threshold=gc.get_threshold()[0],
        loop=type(asyncio.get_running_loop()).__module__.split(".")[0],  # "uvloop" or "asyncio"
        requested_loop=_chosen.get("requested", "auto"),
    )


class GcMeter:
    """Counts collections per generation and the CPU time they take (the thread's, so a busy machine does not
    inflate it), for the summary logged at exit."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.cpu_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.cpu_s += time.thread_time() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> "GcMeter":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)
        if _chosen.pop("frozen", None):  # the worker ran; a failed start ends with its error line alone
            log.info("gc_summary", collections=self.collections, gc_cpu_ms=round(self.cpu_s * 1000, 1))


def run(main: Coroutine[Any, Any, T], loop: str, gc_threshold: int) -> T:
    """Runs `main` to completion on the chosen event loop, with the collector tuned."""
    _, factory = loop_factory(loop)
    tune_gc(gc_threshold)
    _chosen["requested"] = loop
    with GcMeter(), asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)

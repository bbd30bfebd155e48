"""What the benchmarks share: namespaces, tenant files, request bodies, worker subprocesses and their RSS."""

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange

from contracts import REQUEST_ROUTING_KEY, Topology
from tests import samples
from tests.broker import delete_namespace
from worker.broker.topology import declare, topology_spec
from worker.handling.ladder import RetryLadder

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def amqp_url() -> str:
    return os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)


def incident_body(tenant_id: str, request_id: str, task: str = "summary") -> bytes:
    """The ~2 KB demo incident, as every benchmark request carries it."""
    return orjson.dumps(samples.request(tenant_id, task, request_id=request_id))


def padded_body(tenant_id: str, request_id: str, size: int = 4096, task: str = "summary") -> bytes:
    """The demo incident with its log lines repeated until the body is about `size` bytes (the issue's ~4 KB)."""
    request = samples.request(tenant_id, task, request_id=request_id)
    logs = request["incident"]["logs"]
    original = list(logs)
    while len(orjson.dumps(request)) < size:
        logs.extend(original[: max(1, len(original))])
    return orjson.dumps(request)


def write_tenant(
    directory: Path,
    tenant_id: str,
    base_url: str,
    *,
    policy: str = "fail_closed",
    max_attempts: int = 3,
    timeout_s: float = 30,
    max_concurrency: int = 256,
    api_key_env: str | None = None,
    model: str = "bench-model",
) -> None:
    key = f'api_key = "env:{api_key_env}"\n' if api_key_env else ""
    (directory / f"{tenant_id}.toml").write_text(
        f'tenant_id = "{tenant_id}"\n'
        "[provider]\n"
        'kind = "openai_compatible"\n'
        f'base_url = "{base_url}"\n'
        f'model = "{model}"\n'
        f"{key}"
        "[fallback]\n"
        f'policy = "{policy}"\n'
        f"max_attempts = {max_attempts}\n"
        "[limits]\n"
        f"timeout_s = {timeout_s}\n"
        f"max_concurrency = {max_concurrency}\n"
    )


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc (Linux)."""
    fields: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(pid: int) -> int:
    """CPU time of all a process's threads in nanoseconds (schedstat), finer than /proc/<pid>/stat's ticks; falls
    back to those ticks where the kernel keeps no schedstat."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += int((task / "schedstat").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return int(cpu_seconds(pid) * 1e9)
    return total or int(cpu_seconds(pid) * 1e9)


@dataclass
class Namespace:
    """A fresh namespace with the worker's topology declared, deleted on exit."""

    topology: Topology
    connection: aio_pika.abc.AbstractConnection
    channel: AbstractChannel
    requests: AbstractExchange

    async def reply_queue(self, name: str | None = None) -> aio_pika.abc.AbstractQueue:
        # Not exclusive: the worker (another connection) publishes to it through the default exchange.
        return await self.channel.declare_queue(name or f"{self.topology.namespace}.bench-replies", auto_delete=False)


@asynccontextmanager
async def namespace(
    prefix: str, ladder: RetryLadder | None = None, delivery_limit: int = 20
) -> AsyncIterator[Namespace]:
    topology = Topology(f"{prefix}-{uuid.uuid4().hex[:8]}")
    url = amqp_url()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, topology_spec(topology, ladder or RetryLadder(), delivery_limit=delivery_limit))
        requests = await channel.get_exchange(topology.requests, ensure=False)
        yield Namespace(topology, connection, channel, requests)
    finally:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.queue_delete(f"{topology.namespace}.bench-replies")
        await connection.close()
        await delete_namespace(url, topology, (f"{topology.namespace}.atlas-cloud",))


def request_message(body: bytes, reply_to: str, correlation_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/json",
        reply_to=reply_to,
        correlation_id=correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def preload(ns: Namespace, bodies: Sequence[tuple[str, bytes]], reply_to: str, window: int = 256) -> None:
    """Publish (correlation_id, body) pairs with confirms, `window` outstanding at a time."""
    pending: set[asyncio.Future[Any]] = set()
    for correlation_id, body in bodies:
        pending.add(
            asyncio.ensure_future(
                ns.requests.publish(request_message(body, reply_to, correlation_id), REQUEST_ROUTING_KEY)
            )
        )
        if len(pending) >= window:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                future.result()
    if pending:
        for future in asyncio.as_completed(pending):
            await future


class Process:
    """A subprocess whose stderr goes to a log file; `ready()` waits for a marker line in it."""

    def __init__(
        self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd  # another checkout's directory runs that checkout's code
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at_offset = 0  # logs are appended to across restarts; this start's lines begin here

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.started_at_offset = self.log_size()
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **(self.env or {})},
            )
        finally:
            log.close()

    async def ready(self, marker: bytes, timeout_s: float = 30.0) -> None:
        """Wait for `marker` among the lines this start wrote to the log."""
        after = self.started_at_offset
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"{self.argv[2]} exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(FileNotFoundError):
                if marker in self.log_path.read_bytes()[after:]:
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.argv} not ready after {timeout_s}s; see {self.log_path}")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.kill()
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def python() -> str:
    return sys.executable


def worker_argv(
    url: str,
    namespace_name: str,
    tenants: Path,
    *,
    prefetch: int,
    ladder: RetryLadder | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`python -m worker run …`: the worker exactly as it is deployed."""
    argv = [
        python(),
        "-m",
        "worker",
        "run",
        "--amqp-url",
        url,
        "--namespace",
        namespace_name,
        "--tenants",
        str(tenants),
        "--prefetch",
        str(prefetch),
        "--atlas-cloud-exchange",
        f"{namespace_name}.atlas-cloud",
        "--grace",
        "5",
    ]
    if ladder is not None:
        argv += [
            "--retry-base",
            f"{ladder.base_s:g}",
            "--retry-factor",
            f"{ladder.factor:g}",
            "--retry-levels",
            str(ladder.levels),
        ]
    return argv + list(extra)


async def start_fake_provider(
    logs: Path, name: str, latency_s: float, hosts: Sequence[str] = ("127.0.0.1",)
) -> tuple[Process, int]:
    """The fixed-latency provider in its own process, so its CPU is not the benchmark's."""
    fake = Process(
        [python(), "-m", "bench.fake_provider", "--latency", f"{latency_s:g}", "--hosts", ",".join(hosts)],
        logs / f"{name}-provider.log",
    )
    await fake.start()
    await fake.ready(b"listening")
    for line in fake.log_path.read_bytes()[fake.started_at_offset :].decode().splitlines():
        if line.startswith("listening "):
            return fake, int(line.split()[1])
    raise RuntimeError("fake provider printed no port")

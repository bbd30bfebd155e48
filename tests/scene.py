"""Scenes: a tenant with a scripted provider, a request sent, its settlement awaited, then what each queue holds."""

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from contracts import Topology
from tests.broker import BrokerClient, drain_now
from tests.conftest import RunningWorker, running_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI
from worker.app import WorkerApp
from worker.broker.consumer import Settled
from worker.handling.outcome import Defer, Retry

SETTLE_TIMEOUT_S = 30.0


async def until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait until `condition()` holds, polling the worker's own state; fail naming `what` if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"{what} not reached in {timeout_s} s"
        await asyncio.sleep(0.02)


def _files(directory: Path) -> dict[Path, tuple[tuple[int, int, int], bytes]]:
    """Each readable file's (inode, mtime, size) stamp and contents."""
    found = {}
    for path in directory.iterdir():
        try:
            info, content = path.stat(), path.read_bytes()
        except OSError:
            continue
        found[path] = ((info.st_ino, info.st_mtime_ns, info.st_size), content)
    return found


@asynccontextmanager
async def tenants_reloaded(app: WorkerApp) -> AsyncIterator[None]:
    """Change the tenants directory inside the block; on leaving, wait until the running worker's reload loop has
    read the change. The registry's version moves only on a reload that saw a change, and none can run while
    the block runs without awaiting, so a later version is a reload that saw the block's change. The block must
    change something (a rewrite with the same bytes is no change, and this would time out)."""
    directory = app.settings.tenants_dir
    before, version = _files(directory), app.registry.version
    yield
    for path, (stamp, content) in _files(directory).items():
        if path in before and before[path][0] == stamp and before[path][1] != content:
            # Rewritten within one tick of the file system clock at the same size: the watcher, which compares
            # stamps, would not see it. Move the mtime on, as a later write would have.
            os.utime(path, ns=(stamp[1], stamp[1] + 1_000_000))
    await until(lambda: app.registry.version > version, what="tenant reload")


async def write_tenant_and_reload(app: WorkerApp, tenant_id: str, base_url: str, **options: Any) -> Path:
    """`write_tenant` into the running worker's tenants directory, then wait until it has loaded the file."""
    async with tenants_reloaded(app):
        return write_tenant(app.settings.tenants_dir, tenant_id, base_url, **options)


class Settlements:
    """What the worker reported through `on_settled`, and a way to await one of them."""

    def __init__(self) -> None:
        self.seen: list[Settled] = []
        self._claimed: set[int] = set()
        self._arrived = asyncio.Event()

    def __call__(self, settled: Settled) -> None:
        self.seen.append(settled)
        self._arrived.set()

    async def final(self, request_id: str | None, timeout_s: float = SETTLE_TIMEOUT_S) -> Settled:
        """The next final settlement of `request_id` (any request's if None) not yet awaited: a retry parked on the
        ladder or a deferral is a step, not the end. Its publishes are confirmed by the time this returns."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for index, settled in enumerate(self.seen):
                if index in self._claimed or isinstance(settled.outcome, Retry | Defer):
                    continue
                if request_id is None or settled.ids.request_id == request_id:
                    self._claimed.add(index)
                    return settled
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"request {request_id} not settled in {timeout_s} s; saw {self.seen}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


@dataclass
class Leftovers:
    """Everything on the observer queues at one moment, after the settlements a test awaited."""

    replies: list[AbstractIncomingMessage]
    retry: list[AbstractIncomingMessage]
    cloud: list[AbstractIncomingMessage]
    dead: list[AbstractIncomingMessage]

    def empty(self) -> bool:
        return not (self.replies or self.retry or self.cloud or self.dead)


@dataclass
class Scene:
    """A running worker, one fake provider, and an observer queue on every place a request can end up: the reply
    queue, the retry ladder, the Atlas Cloud exchange and the dead-letter queue."""

    client: BrokerClient
    running: RunningWorker
    fake: FakeOpenAI
    tenants_dir: Path
    replies: AbstractQueue
    retry: AbstractQueue
    cloud: AbstractQueue
    dead: AbstractQueue
    settlements: Settlements

    @property
    def app(self) -> WorkerApp:
        return self.running.app

    async def tenant(self, tenant_id: str = "acme", **options: Any) -> Path:
        """Give `tenant_id` a tenant file for the fake provider (`write_tenant`'s options) and wait for the reload."""
        return await write_tenant_and_reload(self.app, tenant_id, self.fake.base_url, **options)

    async def send(
        self,
        body: dict[str, Any] | bytes,
        *,
        reply: bool = True,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Settled:
        """Publish a request (answers go to `replies` unless `reply=False`) and wait until it is settled for good."""
        reply_to = self.replies.name if reply else None
        await self.client.publish_request(body, reply_to=reply_to, correlation_id=correlation_id, headers=headers)
        decoded = orjson.loads(body) if isinstance(body, bytes) else body
        return await self.settled(decoded.get("request_id") if isinstance(decoded, dict) else None)

    async def settled(self, request_id: str | None, timeout_s: float = SETTLE_TIMEOUT_S) -> Settled:
        """The next final settlement of `request_id` (see `Settlements.final`)."""
        return await self.settlements.final(request_id, timeout_s)

    async def leftovers(self) -> Leftovers:
        """What every observer queue holds now (taken off the queues)."""
        return Leftovers(
            await drain_now(self.replies),
            await drain_now(self.retry),
            await drain_now(self.cloud),
            await drain_now(self.dead),
        )


@asynccontextmanager
async def open_scene(
    amqp_url: str,
    topology: Topology,
    tenants_dir: Path,
    client: BrokerClient,
    fake: FakeOpenAI,
    **overrides: Any,
) -> AsyncIterator[Scene]:
    """A scene on a worker started with `worker_settings(..., **overrides)`; the worker stops on leaving."""
    settlements = Settlements()
    settings = worker_settings(amqp_url, topology, tenants_dir, **overrides)
    async with running_worker(settings, on_settled=settlements) as running:
        retry = await client.channel.declare_queue("", exclusive=True)
        retry_exchange = await client.channel.get_exchange(topology.retry)
        for level in range(running.app.settings.ladder.levels):
            await retry.bind(retry_exchange, str(level))
        cloud = await client.bind_observer(running.app.settings.atlas_cloud_exchange)
        dead = await client.channel.get_queue(topology.dead)
        replies = await client.reply_queue()
        yield Scene(client, running, fake, tenants_dir, replies, retry, cloud, dead, settlements)

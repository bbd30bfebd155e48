"""Shared fixtures: a broker (skips locally without one, fails in CI), a namespace per test, fakes, a worker."""

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
import structlog

from contracts import Topology
from tests.broker import AmqpUser, BrokerClient, add_user, broker_client, delete_namespace, delete_user, find_broker
from tests.fakes.openai_server import FakeOpenAI
from worker.app import WorkerApp
from worker.handling.ladder import RetryLadder
from worker.log import configure_logging
from worker.providers.breaker import BreakerPolicy
from worker.settings import WorkerSettings
from worker.tenants import NO_TENANTS_MARKER

if TYPE_CHECKING:
    from tests.scene import Scene

configure_logging("warning", cache=False)

# `ATLAS_TEST_LOOP=uvloop pytest …` runs every test on uvloop (worker subprocesses pick their loop with `--loop`).
TEST_LOOP = os.environ.get("ATLAS_TEST_LOOP", "asyncio")
if TEST_LOOP not in ("asyncio", "uvloop"):
    raise pytest.UsageError(f"ATLAS_TEST_LOOP={TEST_LOOP!r}: choose asyncio or uvloop")
if TEST_LOOP == "uvloop":
    import uvloop

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        return {"uvloop": uvloop.new_event_loop}


def pytest_report_header() -> str:
    return f"event loop: {TEST_LOOP}"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For a test that sets the worker's logging up itself (on its captured stderr, say): the logging set up
    before comes back after, so later tests never write to that test's closed capture."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers = root.handlers[:]
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers


def unavailable(message: str) -> NoReturn:
    """A part the broker tests need is missing: skipped on a developer's machine, a failure in CI."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url, container = find_broker()
    if url is None:
        unavailable("no RabbitMQ: set AMQP_URL, start one on 127.0.0.1:5672, or run a Docker engine")
    yield url
    if container is not None:
        container.stop()


@pytest.fixture(scope="session")
def other_user(amqp_url: str) -> Iterator[AmqpUser]:
    """A publisher's own AMQP user, not the worker's (skips locally where it cannot be made, fails in CI)."""
    yield from _made_user(amqp_url)


@pytest.fixture
def third_user(amqp_url: str) -> Iterator[AmqpUser]:
    """Another publisher's user, neither the worker's nor `other_user`."""
    yield from _made_user(amqp_url)


def _made_user(amqp_url: str) -> Iterator[AmqpUser]:
    user = add_user(amqp_url)
    if user is None:
        unavailable("cannot add an AMQP user: the broker is not local or rabbitmqctl is missing")
    yield user
    delete_user(user)


@pytest.fixture
async def topology(amqp_url: str) -> AsyncIterator[Topology]:
    topo = Topology(f"test-{uuid.uuid4().hex[:10]}")
    yield topo
    await delete_namespace(amqp_url, topo, (f"{topo.namespace}.atlas-cloud",))


@pytest.fixture
async def client(amqp_url: str, topology: Topology) -> AsyncIterator[BrokerClient]:
    async with broker_client(amqp_url, topology) as c:
        yield c


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def tenants_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tenants"
    directory.mkdir()
    # Tests start with no tenant files; without the marker an empty directory is a tenant-source fault.
    (directory / NO_TENANTS_MARKER).touch()
    return directory


def write_tenant(
    directory: Path,
    tenant_id: str,
    base_url: str,
    *,
    policy: str = "fail_closed",
    max_attempts: int = 3,
    timeout_s: float = 5,
    max_concurrency: int = 16,
    api_key: str | None = "env:TEST_FAKE_OPENAI_KEY",
    model: str = "fake-model",
) -> Path:
    """A tenant file for the OpenAI fake; `api_key=None` writes none (an endpoint that needs no key)."""
    path = directory / f"{tenant_id}.toml"
    key_line = "" if api_key is None else f'api_key = "{api_key}"'
    path.write_text(f"""
tenant_id = "{tenant_id}"
[provider]
kind = "openai_compatible"
base_url = "{base_url}"
model = "{model}"
{key_line}
[fallback]
policy = "{policy}"
max_attempts = {max_attempts}
[limits]
timeout_s = {timeout_s}
max_concurrency = {max_concurrency}
""")
    return path


@pytest.fixture(autouse=True)
def _fake_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_FAKE_OPENAI_KEY", "sk-test-fake")


def worker_settings(amqp_url: str, topology: Topology, tenants_dir: Path, **overrides: Any) -> WorkerSettings:
    base: dict[str, Any] = dict(
        amqp_url=amqp_url,
        tenants_dir=tenants_dir,
        namespace=topology.namespace,
        prefetch=32,
        atlas_cloud_exchange=f"{topology.namespace}.atlas-cloud",
        grace_s=5.0,
        tenants_poll_s=0.05,  # a test waiting for a reload (tests/scene.py) waits at most this long
        ladder=RetryLadder(base_s=0.2, factor=2.0, levels=4),
        breaker=BreakerPolicy(min_calls=1000),  # tests that are about the breaker pass their own
    )
    return WorkerSettings(**(base | overrides))


class RunningWorker:
    def __init__(self, app: WorkerApp, task: "asyncio.Task[None]") -> None:
        self.app = app
        self.task = task

    async def stop(self) -> None:
        self.app.stop()
        await asyncio.wait_for(self.task, 30)


async def start_worker(settings: WorkerSettings, **options: Any) -> RunningWorker:
    app = WorkerApp(settings, **options)
    task = asyncio.create_task(app.run())
    ready = asyncio.create_task(app.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert app.ready.is_set(), "worker did not become ready"
    return RunningWorker(app, task)


@asynccontextmanager
async def running_worker(settings: WorkerSettings, **options: Any) -> AsyncIterator[RunningWorker]:
    """A worker started with `settings` (and `WorkerApp`'s `options`), stopped on leaving however the block ends."""
    running = await start_worker(settings, **options)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def worker(amqp_url: str, topology: Topology, tenants_dir: Path) -> AsyncIterator[RunningWorker]:
    async with running_worker(worker_settings(amqp_url, topology, tenants_dir)) as running:
        yield running


@pytest.fixture
async def scene(
    amqp_url: str, topology: Topology, tenants_dir: Path, client: BrokerClient, fake_openai: FakeOpenAI
) -> AsyncIterator["Scene"]:
    """A running worker, the OpenAI fake, and observers on every queue a request can reach (see tests/scene.py)."""
    from tests.scene import open_scene  # tests.scene builds on the helpers above

    async with open_scene(amqp_url, topology, tenants_dir, client, fake_openai) as opened:
        yield opened


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound (so no one else gets it) but never
    listening, so a connection attempt is reset instead of answered."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port: int = holder.getsockname()[1]
        yield port

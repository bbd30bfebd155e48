"""Finds a RabbitMQ for the integration tests, and small helpers to publish requests and read queues."""

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from yarl import URL

from contracts import REQUEST_ROUTING_KEY, Topology

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=1):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def find_broker() -> tuple[str | None, Any]:
    """AMQP_URL if set, else the local broker if it answers, else a testcontainers RabbitMQ, else None."""
    if url := os.environ.get("AMQP_URL"):
        return url, None
    if _answers(LOCAL_AMQP_URL):
        return LOCAL_AMQP_URL, None
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.10-management").start()
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
        return f"amqp://guest:guest@{host}:{port}/", container
    return None, None


@dataclass
class BrokerClient:
    """A publisher/observer the way an upstream service or an operator would use the broker."""

    connection: AbstractConnection
    channel: AbstractChannel
    topology: Topology

    async def publish_request(
        self,
        body: dict[str, Any] | bytes,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        exchange = await self.channel.get_exchange(self.topology.requests, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                reply_to=reply_to,
                correlation_id=correlation_id,
                headers=headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            REQUEST_ROUTING_KEY,
        )

    async def reply_queue(self) -> AbstractQueue:
        return await self.channel.declare_queue(f"replies-{uuid.uuid4().hex[:8]}", exclusive=True)

    async def bind_observer(self, exchange: str, routing_key: str = "#") -> AbstractQueue:
        """A queue that sees everything published to `exchange` (declared topic if absent)."""
        ex = await self.channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await self.channel.declare_queue(f"observe-{uuid.uuid4().hex[:8]}", exclusive=True)
        await queue.bind(ex, routing_key)
        return queue


async def collect(queue: AbstractQueue, count: int, timeout_s: float = 20.0) -> list[AbstractIncomingMessage]:
    """Wait for `count` messages on a queue (acking them), or fail with what arrived."""
    received: list[AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(received) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} messages on {queue.name}, got {len(received)}")
            await asyncio.sleep(0.05)
            continue
        received.append(message)
    return received


async def drain_now(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Everything on the queue at this moment."""
    received = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        received.append(message)
    return received


def json_body(message: AbstractIncomingMessage) -> Any:
    return orjson.loads(message.body)


@asynccontextmanager
async def broker_client(url: str, topology: Topology) -> AsyncIterator[BrokerClient]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        yield BrokerClient(connection, channel, topology)
    finally:
        await connection.close()


async def delete_namespace(url: str, topology: Topology, extra_exchanges: tuple[str, ...] = ()) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        names = [topology.requests, topology.replies, topology.dead] + [topology.retry_queue(n) for n in range(30)]
        for name in names:
            await channel.queue_delete(name)
        for name in (topology.requests, topology.retry, topology.replies, topology.dead, *extra_exchanges):
            await channel.exchange_delete(name)
    finally:
        await connection.close()


@dataclass(frozen=True)
class AmqpUser:
    """An AMQP user of its own on the test broker, as a publishing service other than the worker would have."""

    name: str
    url: str


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def add_user(amqp_url: str) -> AmqpUser | None:
    """A new user with every permission on the URL's vhost, made with `rabbitmqctl`: None when this broker is
    not local or the tool is missing (AMQP itself cannot create users)."""
    url = URL(amqp_url)
    if url.host not in ("127.0.0.1", "localhost") or shutil.which("rabbitmqctl") is None:
        return None
    name, password = f"atlas-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    vhost = url.path[1:] or "/"
    _rabbitmqctl("add_user", name, password)
    _rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
    return AmqpUser(name, str(url.with_user(name).with_password(password)))


def delete_user(user: AmqpUser) -> None:
    _rabbitmqctl("delete_user", user.name)

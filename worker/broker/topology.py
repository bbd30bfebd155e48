"""Declares every exchange, queue and binding for a namespace, idempotently, and describes them as data."""

from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, ExchangeType

from contracts import REQUEST_ROUTING_KEY, Topology
from worker.handling.ladder import RetryLadder

# Quorum queues with at-least-once dead-lettering: a message moved by TTL or rejection is kept by the
# source until the target confirms it (needs overflow=reject-publish; RabbitMQ 3.10+).
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]
    bindings: tuple[tuple[str, str], ...]  # (exchange, routing key)


@dataclass(frozen=True)
class TopologySpec:
    """The whole topology as data: what `declare` creates and `topology definitions` prints."""

    exchanges: tuple[tuple[str, ExchangeType], ...]
    queues: tuple[QueueSpec, ...] = field(default_factory=tuple)


def topology_spec(topology: Topology, ladder: RetryLadder, *, delivery_limit: int) -> TopologySpec:
    quorum = {"x-queue-type": "quorum"}
    queues = [
        QueueSpec(
            topology.requests,
            quorum | AT_LEAST_ONCE | {"x-delivery-limit": delivery_limit, "x-dead-letter-exchange": topology.dead},
            ((topology.requests, REQUEST_ROUTING_KEY),),
        ),
        *(
            QueueSpec(
                topology.retry_queue(level),
                quorum
                | AT_LEAST_ONCE
                | {
                    "x-message-ttl": ladder.ttl_ms(level),
                    "x-dead-letter-exchange": topology.requests,
                    "x-dead-letter-routing-key": REQUEST_ROUTING_KEY,
                },
                ((topology.retry, str(level)),),
            )
            for level in range(ladder.levels)
        ),
        QueueSpec(topology.replies, dict(quorum), ((topology.replies, "#"),)),
        QueueSpec(topology.dead, dict(quorum), ((topology.dead, ""),)),
    ]
    exchanges = (
        (topology.requests, ExchangeType.DIRECT),
        (topology.retry, ExchangeType.DIRECT),
        (topology.replies, ExchangeType.TOPIC),
        (topology.dead, ExchangeType.FANOUT),
    )
    return TopologySpec(exchanges, tuple(queues))


@dataclass(frozen=True)
class DeclaredTopology:
    requests_queue: aio_pika.abc.AbstractQueue
    exchanges: dict[str, AbstractExchange]


async def declare(channel: AbstractChannel, spec: TopologySpec) -> DeclaredTopology:
    """Create what is missing; existing entities with the same arguments are left as they are."""
    exchanges = {name: await channel.declare_exchange(name, kind, durable=True) for name, kind in spec.exchanges}
    first_queue = None
    for queue_spec in spec.queues:
        queue = await channel.declare_queue(queue_spec.name, durable=True, arguments=queue_spec.arguments)
        for exchange, routing_key in queue_spec.bindings:
            await queue.bind(exchanges[exchange], routing_key)
        first_queue = first_queue or queue
    assert first_queue is not None
    return DeclaredTopology(first_queue, exchanges)


async def declare_atlas_cloud(connection: aio_pika.abc.AbstractConnection, name: str) -> None:
    """Atlas Cloud owns its exchange: use it as it is if it exists, else create a durable topic exchange."""
    probe = await connection.channel()
    try:
        await probe.declare_exchange(name, passive=True)
        await probe.close()
        return
    except aio_pika.exceptions.ChannelClosed:
        pass
    channel = await connection.channel()
    try:
        await channel.declare_exchange(name, ExchangeType.TOPIC, durable=True)
    finally:
        await channel.close()

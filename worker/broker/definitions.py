"""The topology as RabbitMQ definitions JSON (what `rabbitmqctl import_definitions` loads), and declaring it."""

import json
from typing import Any

import aio_pika
from aio_pika.abc import ExchangeType

from worker.broker.topology import TopologySpec, declare, declare_atlas_cloud


def definitions(spec: TopologySpec, *, vhost: str = "/", atlas_cloud_exchange: str | None = None) -> dict[str, Any]:
    """Exchanges, queues (with arguments) and bindings, exactly as `declare` creates them.
    The Atlas Cloud exchange is included when named: `run` creates it (topic) if Atlas Cloud has not."""
    exchanges = list(spec.exchanges)
    if atlas_cloud_exchange is not None:
        exchanges.append((atlas_cloud_exchange, ExchangeType.TOPIC))
    return {
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": kind.value,
                "durable": True,
                "auto_delete": False,
                "arguments": {},
            }
            for name, kind in sorted(exchanges)
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "type": q.arguments.get("x-queue-type", "classic"),
                "durable": True,
                "auto_delete": False,
                "arguments": dict(q.arguments),
            }
            for q in sorted(spec.queues, key=lambda q: q.name)
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
            for q in sorted(spec.queues, key=lambda q: q.name)
            for exchange, routing_key in q.bindings
        ],
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


async def declare_everything(amqp_url: str, spec: TopologySpec, atlas_cloud_exchange: str) -> None:
    """What `run` declares before it consumes, and nothing else."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await declare(channel, spec)
        await declare_atlas_cloud(connection, atlas_cloud_exchange)
    finally:
        await connection.close()


async def delete_everything(amqp_url: str, spec: TopologySpec, *extra_exchanges: str) -> None:
    """Delete a namespace's queues (messages included) and exchanges; what is already gone is skipped."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for queue in spec.queues:
            await channel.queue_delete(queue.name)
        for name in [name for name, _ in spec.exchanges] + list(extra_exchanges):
            await channel.exchange_delete(name)
    finally:
        await connection.close()

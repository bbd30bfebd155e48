"""The processes the benchmarks race against the worker: plain loops, a FastStream subscriber, and the worker
with an in-process instant provider.

`python -m bench.target worker|baseline|plain|plain-tuned|faststream --namespace NS --prefetch N
[--provider-url URL]`; prints `ready` once consuming and runs until SIGTERM. `plain`, `plain-tuned` and
`faststream` call an OpenAI-compatible provider over HTTP like the worker does; `baseline` only holds each
message for `--delay`. `plain-tuned` is the plain loop on the worker's runtime (uvloop, the worker's GC
threshold, start-up heap frozen): what the libraries alone cost under the same runtime as the worker.
"""

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage

from contracts import Topology
from contracts.tenant import ProviderSettings
from worker import runtime
from worker.app import WorkerApp
from worker.handling.ladder import RetryLadder
from worker.log import configure_logging
from worker.providers.base import Finish, ModelCall, ModelResult, Provider
from worker.settings import WorkerSettings

JSON_HEADERS = {"Content-Type": "application/json"}
ANSWER = (
    "Checkout is failing because the payments database connection pool is exhausted since the 14:02 deploy; "
    "the deploy is being rolled back."
)


class InstantProvider:
    """Answers at once, so what is measured is the worker's own cost per message."""

    kind = "openai_compatible"

    def __init__(self, settings: ProviderSettings) -> None:
        self._settings = settings

    @property
    def endpoint(self) -> str:
        return "in-process"

    @property
    def model(self) -> str:
        return "instant"

    async def aclose(self) -> None:
        pass

    async def complete(self, call: ModelCall) -> ModelResult:
        return ModelResult(ANSWER, Finish.STOP, input_tokens=612, output_tokens=31, model="instant")


def instant_factory(settings: ProviderSettings, session: aiohttp.ClientSession) -> Provider:
    return InstantProvider(settings)


def _on_signal(callback: "asyncio.Event") -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback.set)


async def run_worker(url: str, namespace: str, prefetch: int, tenants: Path, ladder: RetryLadder) -> None:
    settings = WorkerSettings(
        amqp_url=url,
        tenants_dir=tenants,
        namespace=namespace,
        prefetch=prefetch,
        atlas_cloud_exchange=f"{namespace}.atlas-cloud",
        grace_s=5.0,
        ladder=ladder,
    )
    app = WorkerApp(settings, provider_factories={"openai_compatible": instant_factory})
    stop = asyncio.Event()
    _on_signal(stop)
    running = asyncio.create_task(app.run())
    await app.ready.wait()
    print("ready", file=sys.stderr, flush=True)
    await stop.wait()
    app.stop()
    await running


async def run_baseline(url: str, namespace: str, prefetch: int, delay_s: float) -> None:
    """What a competent developer writes in ten lines: no validation, no policy, no logging."""
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(Topology(namespace).requests, ensure=False)

    async def on_message(message: AbstractIncomingMessage) -> None:
        request = orjson.loads(message.body)
        if delay_s:
            await asyncio.sleep(delay_s)
        reply = orjson.dumps({"request_id": request["request_id"], "status": "ok", "result": {"text": ANSWER}})
        await reply_and_ack(channel, message, reply)

    await consume_until_signalled(queue, on_message)
    await connection.close()


async def reply_and_ack(channel: aio_pika.abc.AbstractChannel, message: AbstractIncomingMessage, reply: bytes) -> None:
    """What both plain loops do with an answer: a persistent reply to `reply_to`, then the ack."""
    await channel.default_exchange.publish(
        aio_pika.Message(
            reply,
            content_type="application/json",
            correlation_id=message.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        message.reply_to or "",
    )
    await message.ack()


async def consume_until_signalled(
    queue: aio_pika.abc.AbstractQueue, on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]
) -> None:
    await queue.consume(on_message)
    print("ready", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    _on_signal(stop)
    await stop.wait()


def chat_body(request: dict[str, Any]) -> bytes:
    """The smallest honest prompt: the incident as JSON in one user message."""
    incident = orjson.dumps(request.get("incident", {})).decode()
    return orjson.dumps(
        {
            "model": "bench-model",
            "messages": [{"role": "system", "content": "Summarise."}, {"role": "user", "content": incident}],
        }
    )


async def ask(session: aiohttp.ClientSession, url: str, request: dict[str, Any]) -> bytes:
    async with session.post(url, data=chat_body(request), headers=JSON_HEADERS) as response:
        answer = await response.json(loads=orjson.loads)
    text = answer["choices"][0]["message"]["content"]
    return orjson.dumps({"request_id": request.get("request_id"), "status": "ok", "result": {"text": text}})


def unlimited_session() -> aiohttp.ClientSession:
    # No connection cap, like the worker's session: aiohttp's default of 100 would throttle a slow provider.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))


async def run_plain(url: str, namespace: str, prefetch: int, provider_url: str, *, freeze: bool = False) -> None:
    """The plain loop with a real provider call: consume → aiohttp POST → reply (confirmed) → ack."""
    if freeze:
        runtime.freeze_heap()
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(Topology(namespace).requests, ensure=False)
    session = unlimited_session()

    async def on_message(message: AbstractIncomingMessage) -> None:
        reply = await ask(session, provider_url, orjson.loads(message.body))
        await reply_and_ack(channel, message, reply)

    await consume_until_signalled(queue, on_message)
    await connection.close()
    await session.close()


async def run_faststream(url: str, namespace: str, prefetch: int, provider_url: str) -> None:
    """A FastStream subscriber as its documentation writes one, calling the provider with aiohttp."""
    from faststream.rabbit import RabbitBroker, RabbitMessage, RabbitQueue
    from faststream.rabbit.schemas import Channel

    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=prefetch, publisher_confirms=True))
    session = unlimited_session()
    queue = RabbitQueue(Topology(namespace).requests, declare=False)

    @broker.subscriber(queue, no_reply=True)
    async def handle(body: dict[str, Any], message: RabbitMessage) -> None:
        reply = await ask(session, provider_url, body)
        await broker.publish(
            reply,
            routing_key=message.reply_to,
            correlation_id=message.correlation_id,
            content_type="application/json",
            persist=True,
        )

    await broker.start()
    print("ready", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    _on_signal(stop)
    await stop.wait()
    await broker.stop()
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["worker", "baseline", "plain", "plain-tuned", "faststream"])
    parser.add_argument("--provider-url", default="", help="plain, faststream: the chat completions URL")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--tenants", type=Path, default=Path("."))
    parser.add_argument("--delay", type=float, default=0.0, help="baseline only: seconds to hold each message")
    parser.add_argument("--retry-base", type=float, default=1.0)
    parser.add_argument("--retry-factor", type=float, default=2.5)
    parser.add_argument("--retry-levels", type=int, default=8)
    args = parser.parse_args()
    configure_logging("info")
    if args.mode == "worker":
        ladder = RetryLadder(args.retry_base, args.retry_factor, args.retry_levels)
        asyncio.run(run_worker(args.amqp_url, args.namespace, args.prefetch, args.tenants, ladder))
    elif args.mode == "plain":
        asyncio.run(run_plain(args.amqp_url, args.namespace, args.prefetch, args.provider_url))
    elif args.mode == "plain-tuned":
        plain = run_plain(args.amqp_url, args.namespace, args.prefetch, args.provider_url, freeze=True)
        runtime.run(plain, "auto", runtime.DEFAULT_GC_THRESHOLD)
    elif args.mode == "faststream":
        asyncio.run(run_faststream(args.amqp_url, args.namespace, args.prefetch, args.provider_url))
    else:
        asyncio.run(run_baseline(args.amqp_url, args.namespace, args.prefetch, args.delay))


if __name__ == "__main__":
    main()

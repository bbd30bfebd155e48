"""Benchmark 5: the worker's RSS after N requests vs after 10 N (growth means something is kept per request)."""

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    Process,
    amqp_url,
    incident_body,
    namespace,
    request_message,
    rss_kib,
    start_fake_provider,
    worker_argv,
    write_tenant,
)
from contracts import REQUEST_ROUTING_KEY
from worker.handling.ladder import RetryLadder

WINDOW = 400  # requests outstanding at a time: a steady load, not a backlog


@dataclass
class MemoryResult:
    checkpoints: list[tuple[int, float]] = field(default_factory=list)  # (replies so far, RSS MiB)

    @property
    def growth(self) -> float:
        first, last = self.checkpoints[0][1], self.checkpoints[-1][1]
        return (last - first) / first


async def run(first: int, total: int, logs: Path, samples: int = 5) -> MemoryResult:
    result = MemoryResult()
    marks = sorted({first, *(first + (total - first) * k // (samples - 1) for k in range(1, samples)), total})
    ladder = RetryLadder()
    fake, port = await start_fake_provider(logs, "memory", 0.0)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tenants-") as directory:
            tenants = Path(directory)
            tasks = ("summary", "chat")
            for n in range(4):
                write_tenant(tenants, f"m{n}", f"http://127.0.0.1:{port}/v1", max_concurrency=WINDOW)
            async with namespace("bench-mem", ladder) as ns:
                replies = await ns.reply_queue()
                worker = Process(
                    worker_argv(amqp_url(), ns.topology.namespace, tenants, prefetch=WINDOW, ladder=ladder),
                    logs / "memory-worker.log",
                )
                received = 0
                slots = asyncio.Semaphore(WINDOW)
                done = asyncio.Event()

                async def on_reply(message: AbstractIncomingMessage) -> None:
                    nonlocal received
                    received += 1
                    slots.release()
                    if marks and received >= marks[0]:
                        mark = marks.pop(0)
                        result.checkpoints.append((mark, rss_kib(worker.pid)[0] / 1024))
                        print(f"  memory: {mark:6} replies  RSS {result.checkpoints[-1][1]:6.1f} MiB", flush=True)
                    if received >= total:
                        done.set()

                tag = await replies.consume(on_reply, no_ack=True)
                await worker.start()
                try:
                    await worker.ready(b"worker_started")
                    for i in range(total):
                        await slots.acquire()
                        tenant = f"m{i % 4}"
                        body = incident_body(tenant, f"mem-{i}", tasks[i % 2])
                        if tasks[i % 2] == "chat":
                            body = body.replace(
                                b'"task":"chat"',
                                b'"task":"chat","messages":[{"role":"user","content":"What changed?"}]',
                            )
                        await ns.requests.publish(request_message(body, replies.name, str(i)), REQUEST_ROUTING_KEY)
                    await asyncio.wait_for(done.wait(), 120)
                finally:
                    await replies.cancel(tag)
                    await worker.stop()
    finally:
        await fake.stop()
    return result

"""Runs the soak: faulty tenant providers, two workers behind a TCP proxy, kills and cuts on a schedule.

Requests are published at a steady rate straight to the broker; on a schedule a worker is `kill -9`ed and
restarted, or every worker connection is cut at the proxy.
"""

import asyncio
import contextlib
import secrets
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.common import Process, amqp_url, namespace, request_message, worker_argv
from chaos.accounting import Observation, observe_copy, observe_reply
from chaos.provider import FaultyProvider
from contracts import REQUEST_ROUTING_KEY
from tests import samples
from tests.fakes.tcp_proxy import TcpProxy
from worker.handling.ladder import RetryLadder

LADDER = RetryLadder(0.2, 2.0, 4)
TENANTS: dict[str, str] = {  # tenant → fallback policy; "none" has no file and is served by Atlas Cloud
    "closed-a": "fail_closed",
    "closed-b": "fail_closed",
    "retry-a": "queue_and_retry",
    "retry-b": "queue_and_retry",
    "cloud-a": "atlas_cloud",
    "cloud-b": "atlas_cloud",
    "unconfigured": "none",
}
TIMEOUT_S = 1.0
MAX_ATTEMPTS = 4


@dataclass
class SoakResult:
    published: dict[str, str] = field(default_factory=dict)  # request_id → tenant_id
    observations: list[Observation] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)  # everything a secret must not appear in
    canaries: dict[str, str] = field(default_factory=dict)  # tenant → key value
    events: list[tuple[float, str]] = field(default_factory=list)
    kills: int = 0
    cuts: int = 0
    source_faults: int = 0  # tenant-source faults: the directory unmounted, a tenant file rewritten with bad bytes
    left_in_queues: dict[str, int] = field(default_factory=dict)
    provider_answers: dict[str, int] = field(default_factory=dict)
    keys_used: dict[str, bool] = field(default_factory=dict)  # tenant → its provider saw its key, never a wrong one
    settled_after_last_cut: list[int] = field(default_factory=list)  # per worker, with no restart since the cut
    metrics_scraped: int = 0
    healthy: set[str] = field(default_factory=set)  # request ids whose fate lets them succeed within attempts
    wall_s: float = 0.0
    logs: Path = Path()


def _write_tenant(directory: Path, tenant: str, policy: str, base_url: str, key_env: str) -> None:
    (directory / f"{tenant}.toml").write_text(
        f'tenant_id = "{tenant}"\n[provider]\nkind = "openai_compatible"\nbase_url = "{base_url}"\n'
        f'model = "fake-model"\napi_key = "env:{key_env}"\n[fallback]\npolicy = "{policy}"\n'
        f"max_attempts = {MAX_ATTEMPTS}\n[limits]\ntimeout_s = {TIMEOUT_S}\nmax_concurrency = 24\n"
    )


SOURCE_FAULT_S = 2.0


async def break_tenant_source(directory: Path, step: str) -> None:
    """Unmount the tenants directory, or rewrite a sovereign tenant's file with bytes that are not UTF-8, for a
    while: neither may look like "no BYOC config" (the soak counts what reaches the atlas-cloud exchange)."""
    if step == "source removed":
        parked = directory.with_name(directory.name + "-parked")
        directory.rename(parked)
        await asyncio.sleep(SOURCE_FAULT_S)
        parked.rename(directory)
        return
    victim = sorted(directory.glob("*.toml"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good.replace(b"tenant_id", b"tenant_\xff\xfeid"))
    await asyncio.sleep(SOURCE_FAULT_S)
    victim.write_bytes(good)


def _request_body(index: int, tenant: str) -> tuple[str, bytes]:
    request_id = f"chaos-{index:05d}"
    body = samples.request(tenant, ("summary", "rca")[index % 2], request_id=request_id)
    # The title makes every prompt unique, so the provider's per-prompt fate is per request.
    body["incident"]["title"] = f"{body['incident']['title']} [{request_id}]"
    return request_id, orjson.dumps(body)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(request_id: str, provider: FaultyProvider, policy: str) -> bool:
    """Would this request succeed within its attempts, given the fate its provider keeps for it?"""
    kind, faulty_calls = provider.fate(request_id)
    if kind is None:
        return True
    return policy == "queue_and_retry" and faulty_calls is not None and faulty_calls < MAX_ATTEMPTS


async def run(
    requests: int,
    rate: float,
    logs: Path,
    breaker_cooldown_s: float | None = 1.0,
    settle_timeout_s: float = 240.0,
    *,
    keyed: bool = False,
) -> SoakResult:
    """`keyed`: every faulty request fails on every call, and healthy ones never do (issue 12's shape);
    otherwise retried faulty requests heal after 1 or 2 calls. `breaker_cooldown_s` None: the worker's default."""
    result = SoakResult(logs=logs)
    started = time.monotonic()
    providers: dict[str, FaultyProvider] = {}
    env: dict[str, str] = {}
    tenants_dir = logs / "tenants"
    tenants_dir.mkdir(parents=True, exist_ok=True)
    for tenant, policy in TENANTS.items():
        if policy == "none":
            continue
        key = f"sk-canary-{tenant}-{secrets.token_hex(12)}"
        result.canaries[tenant] = key
        env_name = f"CHAOS_KEY_{tenant.upper().replace('-', '_')}"
        env[env_name] = key
        heals = policy == "queue_and_retry" and not keyed
        # Retried requests heal after 1 or 2 failed calls or never (max_attempts 4 dead-letters those).
        provider = FaultyProvider(key, hang_s=TIMEOUT_S + 2, faulty_calls=(1, 2, None) if heals else (None,))
        providers[tenant] = provider
        _write_tenant(tenants_dir, tenant, policy, await provider.start(), env_name)

    broker = urlsplit(amqp_url())
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    await proxy.start()
    credentials, at, _ = broker.netloc.rpartition("@")
    via_proxy = urlunsplit(broker._replace(netloc=f"{credentials}{at}127.0.0.1:{proxy.port}"))
    metrics_ports = [_free_port(), _free_port()]
    workers: list[Process] = []
    cut_offsets: list[int] = []
    try:
        async with namespace("chaos", LADDER) as ns:
            cloud_exchange = await ns.channel.declare_exchange(
                f"{ns.topology.namespace}.atlas-cloud", aio_pika.ExchangeType.TOPIC, durable=True
            )
            cloud = await ns.channel.declare_queue(f"{ns.topology.namespace}.observe-cloud", durable=True)
            await cloud.bind(cloud_exchange, "#")
            replies = await ns.reply_queue(f"{ns.topology.namespace}.chaos-replies")
            dead = await ns.channel.get_queue(ns.topology.dead)

            def sink(kind: str) -> Any:
                async def on_message(message: AbstractIncomingMessage) -> None:
                    headers = dict(message.headers or {})
                    result.blobs += [message.body, repr(headers).encode()]
                    if kind == "reply":
                        result.observations.append(observe_reply(message.body, message.correlation_id))
                    else:
                        result.observations.append(observe_copy(kind, message.body, headers))

                return on_message

            tags = [
                (replies, await replies.consume(sink("reply"), no_ack=True)),
                (dead, await dead.consume(sink("dead"), no_ack=True)),
                (cloud, await cloud.consume(sink("cloud"), no_ack=True)),
            ]

            cooldown_flag = [] if breaker_cooldown_s is None else ["--breaker-cooldown", f"{breaker_cooldown_s:g}"]
            for n in range(2):
                argv = worker_argv(
                    via_proxy,
                    ns.topology.namespace,
                    tenants_dir,
                    prefetch=64,
                    ladder=LADDER,
                    extra=["--metrics-port", str(metrics_ports[n]), *cooldown_flag],
                )
                workers.append(Process(argv, logs / f"worker-{n + 1}.log", env=env))
            for worker in workers:
                await worker.start()
            for worker in workers:
                await worker.ready(b"worker_started")

            def event(text: str) -> None:
                result.events.append((time.monotonic() - started, text))
                print(f"  {time.monotonic() - started:6.1f}s  {text}", flush=True)

            async def chaos_schedule(duration_s: float) -> None:
                # Kills alternate between the two workers; cuts fall between kills.
                # The last step is a cut with no restart after it: both workers must reconnect on their own.
                steps = ["kill 1", "source removed", "cut", "kill 2", "source bad bytes", "kill 1", "kill 2", "cut"]
                begin = time.monotonic()
                for n, step in enumerate(steps):
                    # Fixed times while requests are still being published (restarts must not push them later).
                    await asyncio.sleep(max(0.0, begin + (n + 1) * duration_s / (len(steps) + 1) - time.monotonic()))
                    if step.startswith("source"):
                        await break_tenant_source(tenants_dir, step)
                        result.source_faults += 1
                        event(f"tenant source healed after: {step.removeprefix('source ')}")
                        continue
                    if step == "cut":
                        cut_offsets[:] = [worker.log_size() for worker in workers]
                        proxy.cut()
                        result.cuts += 1
                        event("broker connections cut (TCP proxy)")
                        continue
                    worker = workers[int(step[-1]) - 1]
                    worker.kill()
                    assert worker.proc is not None
                    await worker.proc.wait()
                    result.kills += 1
                    event(f"worker {step[-1]} killed (SIGKILL)")
                    await asyncio.sleep(0.5)
                    await worker.start()
                    await worker.ready(b"worker_started")
                    event(f"worker {step[-1]} restarted")

            async def publish() -> None:
                loop = asyncio.get_running_loop()
                begin = loop.time()
                pending = []
                tenants = list(TENANTS)
                for i in range(requests):
                    delay = begin + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tenant = tenants[i % len(tenants)]
                    request_id, body = _request_body(i, tenant)
                    result.published[request_id] = tenant
                    if tenant in providers and _healthy(request_id, providers[tenant], TENANTS[tenant]):
                        result.healthy.add(request_id)
                    pending.append(
                        asyncio.ensure_future(
                            ns.requests.publish(request_message(body, replies.name, request_id), REQUEST_ROUTING_KEY)
                        )
                    )
                await asyncio.gather(*pending)
                event(f"all {requests} requests published")

            event(f"2 workers up behind the proxy; publishing {requests} requests at {rate:g}/s")
            await asyncio.gather(publish(), chaos_schedule(requests / rate))

            deadline = time.monotonic() + settle_timeout_s
            while time.monotonic() < deadline:
                done = {o.request_id for o in result.observations}
                if len(done) >= requests:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)  # late duplicates (a killed worker's redelivered messages) still count
            event(f"{len({o.request_id for o in result.observations})} of {requests} requests have an outcome")

            for port in metrics_ports:
                with contextlib.suppress(OSError):
                    body = await asyncio.to_thread(_scrape, f"http://127.0.0.1:{port}/metrics")
                    result.blobs.append(body)
                    result.metrics_scraped += 1
            for worker in workers:
                await worker.stop()
            await asyncio.sleep(0.5)
            for queue, tag in tags:
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            channel = await ns.connection.channel()
            for name in [ns.topology.requests] + [ns.topology.retry_queue(n) for n in range(LADDER.levels)]:
                declared = await channel.declare_queue(name, passive=True)
                result.left_in_queues[name] = declared.declaration_result.message_count or 0
            await channel.queue_delete(cloud.name)
            await channel.queue_delete(replies.name)
    finally:
        for worker in workers:
            worker.kill()
        await proxy.close()
        for provider in providers.values():
            await provider.close()
    for n, worker in enumerate(workers):
        log = worker.log_path.read_bytes()
        result.blobs.append(log)
        if cut_offsets:
            result.settled_after_last_cut.append(log[cut_offsets[n] :].count(b'"event":"request_settled"'))
    answers: dict[str, int] = {}
    for tenant, provider in providers.items():
        result.keys_used[tenant] = provider.served["ok"] > 0 and provider.served["unauthorized"] == 0
        for kind, count in provider.served.items():
            answers[kind] = answers.get(kind, 0) + count
    result.provider_answers = answers
    result.wall_s = time.monotonic() - started
    return result


def _scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        data: bytes = response.read()
        return data

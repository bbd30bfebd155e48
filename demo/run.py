"""`make demo`: a worker, a stand-in model and sample incidents for two tenants, answered end to end.

Starts the stand-in model server and `atlas-worker run` as child processes, publishes every incident in
`demo/incidents/` for tenants acme (summary, rca, runbook) and globex (summary), plus one request for
initech, which has no BYOC config and is therefore rerouted to Atlas Cloud, then prints what came back.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aio_pika
import orjson

ROOT = Path(__file__).resolve().parent.parent
INCIDENTS = ROOT / "demo" / "incidents"
NAMESPACE = "demo"
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
STANDIN_PORT = 8089


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


async def _wait_for_port(host: str, port: int, what: str, timeout_s: float = 20) -> None:
    for _ in range(int(timeout_s * 10)):
        if _port_open(host, port):
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"{what} did not start on {host}:{port}")


def _requests() -> list[dict[str, Any]]:
    incidents = {p.stem: orjson.loads(p.read_bytes()) for p in sorted(INCIDENTS.glob("*.json"))}
    plan = [("acme", task) for task in ("summary", "rca", "runbook")] + [("globex", "summary")]
    requests = []
    for name, incident in incidents.items():
        for tenant, task in plan:
            requests.append(
                {"request_id": f"{name}-{tenant}-{task}", "tenant_id": tenant, "task": task, "incident": incident}
            )
    first = next(iter(incidents.values()))
    requests.append({"request_id": "initech-summary", "tenant_id": "initech", "task": "summary", "incident": first})
    return requests


def _show(reply: dict[str, Any]) -> str:
    head = f"● {reply['request_id']}  tenant={reply['tenant_id']} task={reply['task']} status={reply['status']}"
    provenance, usage, timings = reply.get("provenance", {}), reply.get("usage", {}), reply.get("timings", {})
    meta = (
        f"  via {provenance.get('provider_kind')} model={provenance.get('model')} "
        f"attempts={provenance.get('attempts')} tokens={usage.get('input_tokens')}→{usage.get('output_tokens')} "
        f"provider={timings.get('provider_ms')}ms total={timings.get('total_ms')}ms"
    )
    result = reply.get("result") or {}
    body: list[str] = []
    if result.get("text"):
        body.append(result["text"])
    if rca := result.get("rca"):
        body.append(f"summary: {rca['summary']}")
        for cause in rca["probable_causes"]:
            refs = ", ".join(f"{e['kind']} {e['index']}" for e in cause["evidence"])
            body.append(f"cause ({cause['confidence']:.0%}): {cause['title']}  [evidence: {refs}]")
        body += [f"step: {step['action']} (risk {step['risk']})" for step in rca["remediation"]]
    for number, call in enumerate(result.get("tool_calls") or [], 1):
        body.append(f"{number}. {call['name']}({orjson.dumps(call['arguments']).decode()})")
    if error := reply.get("error"):
        body.append(f"error {error['code']}: {error['message']}")
    wrapped = [textwrap.shorten(line, 150) for line in body]
    return "\n".join([head, meta, *("    " + line for line in wrapped)])


async def _publish_and_collect(requests: list[dict[str, Any]]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(f"demo-replies-{uuid.uuid4().hex[:6]}", exclusive=True)
        cloud_exchange = await channel.declare_exchange("demo.atlas-cloud", aio_pika.ExchangeType.TOPIC, durable=True)
        cloud = await channel.declare_queue("demo-atlas-cloud-observer", exclusive=True)
        await cloud.bind(cloud_exchange, "#")
        requests_exchange = await channel.get_exchange(f"{NAMESPACE}.requests")
        for request in requests:
            await requests_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(request),
                    content_type="application/json",
                    reply_to=replies.name,
                    correlation_id=request["request_id"],
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="request",
            )
        print(f"published {len(requests)} requests to {NAMESPACE}.requests\n")
        expected_replies = sum(1 for r in requests if r["tenant_id"] != "initech")
        answered = 0
        async with replies.iterator(timeout=60) as messages:
            async for message in messages:
                async with message.process():
                    print(_show(orjson.loads(message.body)) + "\n")
                answered += 1
                if answered == expected_replies:
                    break
        rerouted = await cloud.get(timeout=10, fail=False)
        if rerouted is not None:
            await rerouted.ack()
            headers = rerouted.headers or {}
            print(
                f"● initech has no BYOC config: its request went to Atlas Cloud (exchange demo.atlas-cloud), "
                f"body unchanged, reason={headers.get('atlas-reason')}"
            )
        print(f"\n{answered} replies received; 1 request rerouted to Atlas Cloud.")


async def main() -> int:
    broker = urlparse(AMQP_URL)
    if not _port_open(broker.hostname or "127.0.0.1", broker.port or 5672):
        print(
            f"No RabbitMQ answers at {AMQP_URL}. Start one (e.g. `rabbitmq-server -detached`, or "
            "`docker compose -f deploy/compose.yaml up -d rabbitmq`) or set AMQP_URL.",
            file=sys.stderr,
        )
        return 2
    env = os.environ | {"ACME_LLM_API_KEY": "demo-key-not-secret", "AMQP_URL": AMQP_URL}
    print(
        "Starting the STAND-IN model server (deterministic answers, no real LLM) on port "
        f"{STANDIN_PORT}, and the worker (namespace {NAMESPACE!r}).\n"
    )
    standin = subprocess.Popen(
        [sys.executable, "-m", "demo.standin_model", "--port", str(STANDIN_PORT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    log_path = ROOT / ".demo" / "worker.log"
    log_path.parent.mkdir(exist_ok=True)
    with log_path.open("wb") as worker_log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "run",
                "--tenants",
                str(ROOT / "tenants"),
                "--namespace",
                NAMESPACE,
                "--atlas-cloud-exchange",
                "demo.atlas-cloud",
                "--grace",
                "5",
            ],
            cwd=ROOT,
            env=env,
            stderr=worker_log,
        )
        try:
            await _wait_for_port("127.0.0.1", STANDIN_PORT, "the stand-in model")
            await _wait_for_started(log_path, worker)
            await _publish_and_collect(_requests())
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
            standin.terminate()
            standin.wait(timeout=10)
    print(f"Worker log (JSON, one event per line): {log_path.relative_to(ROOT)}")
    return 0


async def _wait_for_started(log_path: Path, worker: "subprocess.Popen[bytes]") -> None:
    for _ in range(300):
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited early; see {log_path}")
        if b'"worker_started"' in log_path.read_bytes():
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"the worker did not start; see {log_path}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

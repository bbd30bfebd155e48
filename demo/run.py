"""`make demo`: one worker, a stand-in model and five tenants that show what each fallback policy does.

Starts the stand-in model (on a free port) and `atlas-worker run` (in a fresh namespace) as child processes,
writes the tenants' files, publishes requests and prints what came back: a healthy tenant's answers, a
`fail_closed` tenant answered `unavailable`, a `queue_and_retry` tenant answered after two failures through
the retry ladder, a dead letter, and a tenant without a config file rerouted to Atlas Cloud. At the end it
deletes what it declared on the broker, unless `--keep` is given.
"""

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aio_pika
import orjson

from contracts import Topology
from worker.broker.connection import broker_error, first_connection
from worker.broker.definitions import delete_everything
from worker.broker.topology import topology_spec
from worker.exit_codes import ExitCode, StartupError
from worker.handling.ladder import RetryLadder
from worker.settings import WorkerSettings, env_amqp_url

ROOT = Path(__file__).resolve().parent.parent
INCIDENTS = ROOT / "demo" / "incidents"
# Short enough to watch: a retry waits 1 s, then 2 s.
LADDER = RetryLadder(base_s=1.0, factor=2.0, levels=3)
WORKER = ".venv/bin/atlas-worker"


@dataclass(frozen=True)
class DemoTenant:
    tenant_id: str
    model_path: str  # on the stand-in: /v1 answers, /flaky/v1 fails twice first, /down/v1 always fails
    policy: str
    max_attempts: int
    story: str


TENANTS = (
    DemoTenant("acme", "/v1", "queue_and_retry", 5, "acme runs its own model, which is healthy"),
    DemoTenant("globex", "/down/v1", "fail_closed", 5, "globex's model is down; fail_closed: its data never leaves"),
    DemoTenant(
        "hooli", "/flaky/v1", "queue_and_retry", 5, "hooli's model fails twice; queue_and_retry waits on the ladder"
    ),
    DemoTenant(
        "umbrella", "/down/v1", "queue_and_retry", 2, "umbrella's model stays down; after 2 attempts: a dead letter"
    ),
)


def tenant_file(tenant: DemoTenant, model_url: str) -> str:
    return textwrap.dedent(f"""\
        # Written by `make demo`: points at the demo's STAND-IN model, not a real LLM.
        tenant_id = "{tenant.tenant_id}"

        [provider]
        kind = "openai_compatible"
        base_url = "{model_url}{tenant.model_path}"
        model = "standin"
        context_window = 131072

        [fallback]
        policy = "{tenant.policy}"
        max_attempts = {tenant.max_attempts}

        [limits]
        timeout_s = 10
        """)


def requests() -> list[dict[str, Any]]:
    incidents = [orjson.loads(p.read_bytes()) for p in sorted(INCIDENTS.glob("*.json"))]
    plan = [("acme", task, 0) for task in ("summary", "rca", "runbook")]
    plan += [("globex", "summary", 1), ("hooli", "rca", 2), ("umbrella", "summary", 3), ("initech", "summary", 0)]
    return [
        {
            "request_id": f"{tenant}-{task}-{uuid.uuid4().hex[:6]}",
            "tenant_id": tenant,
            "task": task,
            "incident": incidents[n % len(incidents)],
        }
        for tenant, task, n in plan
    ]


def show(reply: dict[str, Any]) -> str:
    head = f"  ● {reply['request_id']}  task={reply['task']}  status={reply['status']}"
    provenance, usage, timings = reply.get("provenance", {}), reply.get("usage") or {}, reply.get("timings", {})
    meta = (
        f"    policy={provenance.get('policy')} attempts={provenance.get('attempts')} "
        f"fallback_used={provenance.get('fallback_used')} data_left_network={provenance.get('data_left_network')} "
        f"tokens={usage.get('input_tokens')}→{usage.get('output_tokens')} total={timings.get('total_ms')}ms"
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
    for number, call in enumerate(result.get("tool_calls") or [], 1):
        body.append(f"{number}. {call['name']}({orjson.dumps(call['arguments']).decode()})")
    if error := reply.get("error"):
        body.append(f"error {error['code']}: {error['message']}")
    return "\n".join([head, meta, *("      " + textwrap.shorten(line, 140) for line in body)])


class Demo:
    def __init__(self, amqp_url: str, workdir: Path, namespace: str) -> None:
        self.amqp_url = amqp_url
        self.workdir = workdir
        self.topology = Topology(namespace)
        self.cloud_exchange = f"{namespace}.atlas-cloud"
        self.tenants_dir = workdir / "tenants"
        self.log_path = workdir / "worker.log"
        self.env = os.environ | {"AMQP_URL": amqp_url}

    def start_model(self) -> tuple["subprocess.Popen[str]", str]:
        model = subprocess.Popen(
            [sys.executable, "-m", "demo.standin_model", "--port", "0"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert model.stdout is not None
        first = model.stdout.readline()  # printed once it listens
        found = re.search(r"http://[\d.]+:\d+", first)
        if found is None:
            raise StartupError(ExitCode.FAILED, f"the stand-in model did not start: {first.strip() or 'no output'}")
        return model, found.group(0)

    def write_tenants(self, model_url: str) -> None:
        self.tenants_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tenants_dir.glob("*.toml"):
            stale.unlink()
        for tenant in TENANTS:
            (self.tenants_dir / f"{tenant.tenant_id}.toml").write_text(tenant_file(tenant, model_url))

    def start_worker(self, log: IO[bytes]) -> "subprocess.Popen[bytes]":
        ladder = ("--retry-base", f"{LADDER.base_s:g}", "--retry-factor", f"{LADDER.factor:g}")
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "worker", "run", "--log-format", "json", "--grace", "5"),
                *("--tenants", str(self.tenants_dir), "--namespace", self.topology.namespace),
                *("--atlas-cloud-exchange", self.cloud_exchange, *ladder, "--retry-levels", str(LADDER.levels)),
            ],
            cwd=ROOT,
            env=self.env,
            stderr=log,
        )

    async def wait_for_worker(self, worker: "subprocess.Popen[bytes]") -> None:
        for _ in range(300):
            if worker.poll() is not None:
                printed = [ln for ln in self.log_path.read_text().splitlines() if ln and not ln.startswith("{")]
                raise StartupError(
                    ExitCode.FAILED, printed[-1] if printed else f"the worker exited; see {self.log_path}"
                )
            if b'"worker_started"' in self.log_path.read_bytes():
                return
            await asyncio.sleep(0.1)
        raise StartupError(ExitCode.FAILED, f"the worker did not start in 30 s; see {self.log_path}")

    async def cleanup(self) -> None:
        spec = topology_spec(self.topology, LADDER, delivery_limit=WorkerSettings.delivery_limit)
        await delete_everything(self.amqp_url, spec, self.cloud_exchange)

    async def exchange(self, batch: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Publish the requests; return the replies by tenant, and the headers of the rerouted request."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            cloud = await channel.declare_queue(exclusive=True)  # stands in for Atlas Cloud's consumer
            await cloud.bind(self.cloud_exchange, "#")
            requests_exchange = await channel.get_exchange(self.topology.requests)
            for request in batch:
                message = aio_pika.Message(
                    orjson.dumps(request),
                    content_type="application/json",
                    reply_to=replies.name,
                    correlation_id=request["request_id"],
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await requests_exchange.publish(message, routing_key="request")
            print(f"published {len(batch)} requests to {self.topology.requests}; the retries take a few seconds\n")
            expected = {r["request_id"] for r in batch if r["tenant_id"] != "initech"}
            received = await _collect(replies, expected)
            rerouted = await cloud.get(timeout=10, fail=False)
            if rerouted is None:
                raise StartupError(ExitCode.FAILED, f"nothing was rerouted to {self.cloud_exchange}")
            await rerouted.ack()
            return received, dict(rerouted.headers or {})

    async def dead_letters(self) -> str:
        """`atlas-worker dlq list` once the dead letter is there (it is published before the failed reply)."""
        result = subprocess.run(
            [sys.executable, "-m", "worker", "dlq", "list", "--namespace", self.topology.namespace],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        return (result.stdout + result.stderr).rstrip()


async def _collect(replies: aio_pika.abc.AbstractQueue, expected: set[str]) -> dict[str, dict[str, Any]]:
    by_tenant: dict[str, dict[str, Any]] = {}
    try:
        async with replies.iterator(timeout=30) as messages:
            async for message in messages:
                async with message.process():
                    reply = orjson.loads(message.body)
                by_tenant.setdefault(reply["tenant_id"], {})[reply["request_id"]] = reply
                expected.discard(reply["request_id"])
                if not expected:
                    break
    except TimeoutError:
        raise StartupError(ExitCode.FAILED, f"no reply in 30 s for {', '.join(sorted(expected))}") from None
    return by_tenant


def print_story(
    replies: dict[str, dict[str, Any]], rerouted: dict[str, Any], namespace: str, dead_letters: str
) -> None:
    for tenant in TENANTS:
        print(f"{tenant.tenant_id} ({tenant.policy}): {tenant.story}")
        for reply in replies.get(tenant.tenant_id, {}).values():
            print(show(reply))
        print()
    print("initech has no config file: its request went to Atlas Cloud unchanged")
    print(f"  reason={rerouted.get('atlas-reason')} from tenant={rerouted.get('atlas-rerouted-from-tenant')}\n")
    print(f"$ atlas-worker dlq list --namespace {namespace}\n{textwrap.indent(dead_letters, '  ')}\n")


def next_steps(namespace: str, tenants_dir: Path, *, kept: bool) -> str:
    if not kept:
        return (
            f"Deleted namespace {namespace!r} from the broker. `make demo ARGS=--keep` keeps it, and prints "
            "commands to try on it."
        )
    tenants = os.path.relpath(tenants_dir)
    commands = [
        f"{WORKER} dlq list --namespace {namespace}",
        f"{WORKER} dlq show ID --namespace {namespace}           # ID, request id or ID prefix",
        f"{WORKER} dlq replay --all --namespace {namespace}",
        f"{WORKER} tenants validate {tenants}",
        f"{WORKER} topology declare --namespace {namespace} --retry-base 1 --retry-factor 2 --retry-levels 3",
        f".venv/bin/python -m demo.run --clean {namespace}    # delete the namespace when done",
    ]
    return f"Kept namespace {namespace!r}. Next, try:\n" + "\n".join(f"  {c}" for c in commands)


async def check_broker(amqp_url: str) -> None:
    """Fail fast, in one line, when no broker answers or it refuses the credentials."""
    try:
        with first_connection():
            connection = await aio_pika.connect(amqp_url, timeout=10)
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise broker_error(exc, amqp_url) from None
    await connection.close()


async def run(demo: Demo, *, keep: bool) -> None:
    model, model_url = demo.start_model()
    print(
        f"Stand-in model (deterministic answers, NOT a real LLM) at {model_url}; namespace {demo.topology.namespace!r}"
    )
    try:
        demo.write_tenants(model_url)
        with demo.log_path.open("wb") as log:
            worker = demo.start_worker(log)
            try:
                await demo.wait_for_worker(worker)
                replies, rerouted = await demo.exchange(requests())
                print_story(replies, rerouted, demo.topology.namespace, await demo.dead_letters())
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(30)
    finally:
        model.terminate()
        model.wait(10)
        if not keep:
            await demo.cleanup()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--keep", action="store_true", help="keep the namespace, its queues and dead letters")
    parser.add_argument("--clean", metavar="NAMESPACE", help="delete a namespace an earlier --keep run left")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".demo", help="tenant files and the worker log")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    amqp_url = env_amqp_url()
    namespace = args.clean or f"demo-{uuid.uuid4().hex[:8]}"
    demo = Demo(amqp_url, args.workdir, namespace)
    try:
        await check_broker(amqp_url)
        if args.clean:
            await demo.cleanup()
            print(f"deleted namespace {namespace!r}")
            return ExitCode.OK
        await run(demo, keep=args.keep)
    except StartupError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.code
    print(next_steps(namespace, demo.tenants_dir, kept=args.keep))
    print(f"Worker log (JSON, one event per line): {os.path.relpath(demo.log_path)}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

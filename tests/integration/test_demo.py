"""`make demo` shows the fallback policies, survives a busy port, and leaves nothing on the broker."""

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

import aio_pika
import pytest

from contracts import Topology
from demo.run import LADDER
from tests.ops.cli import CliResult, atlas_worker
from tests.process import ROOT
from worker.broker.topology import topology_spec
from worker.settings import WorkerSettings

pytestmark = pytest.mark.broker


async def run_demo(amqp_url: str, workdir: Path, *args: str) -> CliResult:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "demo.run",
        "--workdir",
        str(workdir),
        *args,
        cwd=ROOT,
        env=os.environ | {"AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


def namespace_of(result: CliResult) -> str:
    found = re.search(r"namespace '(demo-[0-9a-f]+)'", result.stdout)
    assert found, result.output
    return found.group(1)


async def queues_left(amqp_url: str, namespace: str) -> list[str]:
    """Which of the namespace's queues still exist (a passive declare fails for a missing queue)."""
    spec = topology_spec(Topology(namespace), LADDER, delivery_limit=WorkerSettings.delivery_limit)
    left = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for queue in spec.queues:
            channel = await connection.channel()
            try:
                await channel.declare_queue(queue.name, passive=True)
                left.append(queue.name)
                await channel.close()
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
    return left


def assert_shows_the_product(result: CliResult) -> None:
    assert result.code == 0, result.output
    assert "Traceback" not in result.output
    text = result.stdout
    assert re.search(r"globex-summary-\w+  task=summary  status=unavailable", text)
    assert re.search(r"hooli-rca-\w+  task=rca  status=ok\n    policy=queue_and_retry attempts=3 ", text)
    assert re.search(r"umbrella-summary-\w+  task=summary  status=failed", text)
    assert re.search(r"umbrella +summary +exhausted", text)  # the `dlq list` row
    assert "reason=no_byoc_config" in text


async def test_the_demo_twice_the_second_time_with_the_first_port_busy(amqp_url: str, tmp_path: Path) -> None:
    first = await run_demo(amqp_url, tmp_path)
    assert_shows_the_product(first)
    port_match = re.search(r"at http://127\.0\.0\.1:(\d+)", first.stdout)
    assert port_match, first.stdout
    assert await queues_left(amqp_url, namespace_of(first)) == []

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(port_match.group(1))))
        squatter.listen()
        second = await run_demo(amqp_url, tmp_path)

    assert_shows_the_product(second)
    assert namespace_of(second) != namespace_of(first)
    assert await queues_left(amqp_url, namespace_of(second)) == []


async def test_keep_prints_commands_that_work_on_the_kept_namespace(amqp_url: str, tmp_path: Path) -> None:
    kept = await run_demo(amqp_url, tmp_path, "--keep")
    assert_shows_the_product(kept)
    namespace = namespace_of(kept)
    try:
        assert f"dlq list --namespace {namespace}\n" in kept.stdout
        listed = await atlas_worker("dlq", "list", "--namespace", namespace, amqp_url=amqp_url)
        assert listed.code == 0, listed.output
        assert re.search(r"umbrella +summary +exhausted", listed.stdout)
        assert f"demo.run --clean {namespace}" in kept.stdout
    finally:
        cleaned = await run_demo(amqp_url, tmp_path, "--clean", namespace)

    assert cleaned.code == 0, cleaned.output
    assert await queues_left(amqp_url, namespace) == []


async def test_the_demo_fails_fast_in_one_line_without_a_broker(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result = await run_demo(f"amqp://guest:guest@127.0.0.1:{port}/", tmp_path)

    assert result.code == 3
    assert result.stdout == ""
    assert result.stderr.startswith("error: cannot reach the broker")
    assert len(result.stderr.splitlines()) == 1

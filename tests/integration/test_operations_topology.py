"""`topology definitions` prints exactly what `run` and `topology declare` create on the broker."""

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aio_pika
import pytest

from contracts import Topology
from tests.conftest import start_worker, worker_settings
from tests.ops.cli import atlas_worker

pytestmark = pytest.mark.broker

# The ladder and limits of `worker_settings` in conftest, spelled as flags.
TEST_TOPOLOGY_FLAGS = ("--retry-base", "0.2", "--retry-factor", "2", "--retry-levels", "4", "--delivery-limit", "20")


async def printed_definitions(topology: Topology) -> dict[str, Any]:
    result = await atlas_worker(
        "topology",
        "definitions",
        "--namespace",
        topology.namespace,
        "--atlas-cloud-exchange",
        f"{topology.namespace}.atlas-cloud",
        *TEST_TOPOLOGY_FLAGS,
    )
    assert result.code == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


async def exported_from_broker(amqp_url: str, namespace: str) -> dict[str, list[dict[str, Any]]] | None:
    """What the broker holds for a namespace, per `rabbitmqctl export_definitions` (None if unavailable)."""
    if urlparse(amqp_url).hostname not in ("127.0.0.1", "localhost") or shutil.which("rabbitmqctl") is None:
        return None
    for _ in range(5):
        process = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            "export_definitions",
            "-",
            "-q",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            return None
        try:
            exported = json.loads(out)
            break
        except json.JSONDecodeError:
            # Seen when other tests on the same broker delete entities mid-export; a second look is consistent.
            await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"rabbitmqctl export_definitions printed no JSON: {out[:500]!r} {err[:500]!r}")

    def ours(name: str) -> bool:
        return name.startswith(f"{namespace}.")

    return {
        "exchanges": [e for e in exported["exchanges"] if ours(e["name"])],
        "queues": [q for q in exported["queues"] if ours(q["name"])],
        "bindings": [b for b in exported["bindings"] if ours(b["source"]) and ours(b["destination"])],
    }


def canonical(document: dict[str, Any]) -> dict[str, list[str]]:
    return {
        key: sorted(json.dumps(item, sort_keys=True) for item in document[key])
        for key in ("exchanges", "queues", "bindings")
    }


async def assert_broker_holds(amqp_url: str, definitions: dict[str, Any]) -> None:
    """Over plain AMQP: redeclaring each entity exactly as printed succeeds (the broker refuses an
    inequivalent type or argument with PRECONDITION_FAILED)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        for exchange in definitions["exchanges"]:
            channel = await connection.channel()
            await channel.declare_exchange(exchange["name"], exchange["type"], durable=exchange["durable"])
            await channel.close()
        for queue in definitions["queues"]:
            channel = await connection.channel()
            await channel.declare_queue(queue["name"], durable=queue["durable"], arguments=queue["arguments"])
            await channel.close()
    finally:
        await connection.close()


async def test_definitions_equal_what_run_declares(amqp_url: str, topology: Topology, tenants_dir: Path) -> None:
    running = await start_worker(worker_settings(amqp_url, topology, tenants_dir))
    await running.stop()

    printed = await printed_definitions(topology)

    assert {q["name"] for q in printed["queues"]} == {
        topology.requests,
        topology.replies,
        topology.dead,
        *(topology.retry_queue(level) for level in range(4)),
    }
    await assert_broker_holds(amqp_url, printed)
    exported = await exported_from_broker(amqp_url, topology.namespace)
    if exported is None:
        pytest.skip("rabbitmqctl cannot reach this broker; compared over AMQP only")
    assert canonical(exported) == canonical(printed)


async def test_topology_declare_creates_exactly_the_definitions(amqp_url: str, topology: Topology) -> None:
    declared = await atlas_worker(
        "topology",
        "declare",
        "--namespace",
        topology.namespace,
        "--atlas-cloud-exchange",
        f"{topology.namespace}.atlas-cloud",
        *TEST_TOPOLOGY_FLAGS,
        amqp_url=amqp_url,
    )
    assert declared.code == 0, declared.stderr
    assert topology.requests in declared.stdout

    printed = await printed_definitions(topology)

    await assert_broker_holds(amqp_url, printed)
    exported = await exported_from_broker(amqp_url, topology.namespace)
    if exported is None:
        pytest.skip("rabbitmqctl cannot reach this broker; compared over AMQP only")
    assert canonical(exported) == canonical(printed)


async def test_an_inequivalent_definition_is_noticed(amqp_url: str, topology: Topology) -> None:
    """The AMQP comparison above can fail: a different delivery limit is refused by the broker."""
    assert (await atlas_worker("topology", "declare", "--namespace", topology.namespace, amqp_url=amqp_url)).code == 0
    printed = await printed_definitions(topology)  # --delivery-limit 20 here; declared with the default
    printed["queues"] = [q for q in printed["queues"] if q["name"] == topology.requests]
    printed["queues"][0]["arguments"]["x-delivery-limit"] = 21
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        await assert_broker_holds(amqp_url, {"exchanges": [], "queues": printed["queues"]})

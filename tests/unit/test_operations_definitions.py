"""The definitions JSON shipped in deploy/ is what `atlas-worker topology definitions` prints today."""

import json
from pathlib import Path

import pytest

from worker.cli import build_parser

DEPLOY = Path(__file__).parents[2] / "deploy"


def test_deploy_definitions_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["topology", "definitions"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    shipped = (DEPLOY / "rabbitmq" / "definitions.json").read_text()
    assert shipped == printed, "regenerate: atlas-worker topology definitions > deploy/rabbitmq/definitions.json"


def test_topology_commands_default_to_the_topology_run_declares() -> None:
    parser = build_parser()
    run = parser.parse_args(["run"])
    for command in ("definitions", "declare"):
        topology = parser.parse_args(["topology", command])
        for flag in (
            "namespace",
            "atlas_cloud_exchange",
            "delivery_limit",
            "retry_base",
            "retry_factor",
            "retry_levels",
        ):
            assert getattr(topology, flag) == getattr(run, flag), (command, flag)


def test_definitions_name_the_default_namespace_and_queue_arguments() -> None:
    shipped = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    queues = {q["name"]: q["arguments"] for q in shipped["queues"]}
    assert queues["inference.requests"]["x-queue-type"] == "quorum"
    assert queues["inference.requests"]["x-delivery-limit"] == 20
    assert queues["inference.requests"]["x-dead-letter-exchange"] == "inference.dead"
    assert queues["inference.retry.0"]["x-message-ttl"] == 1000
    assert queues["inference.retry.0"]["x-dead-letter-exchange"] == "inference.requests"
    assert {e["name"]: e["type"] for e in shipped["exchanges"]}["atlas.cloud"] == "topic"

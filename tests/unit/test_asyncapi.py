"""The AsyncAPI document in contracts/ is current, and its schemas accept and refuse what the models do."""

from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
import yaml

from contracts import Header, InferenceReply, Status, Timings, Topology
from contracts.asyncapi import DOCUMENT_PATH, document, render
from tests import samples
from worker.handling.outcome import DeadLetterReason


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT_PATH.read_text())
    return loaded


def validator(spec: dict[str, Any], message: str) -> jsonschema.protocols.Validator:
    payload_ref = spec["components"]["messages"][message]["payload"]["$ref"]
    schema = {"$ref": payload_ref, "components": spec["components"]}
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    checker: jsonschema.protocols.Validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return checker


def test_document_is_current(spec: dict[str, Any]) -> None:
    assert DOCUMENT_PATH.read_text() == render(), "regenerate: python -m contracts.asyncapi"
    assert spec == document()


def test_channel_addresses_are_the_topology_names(spec: dict[str, Any]) -> None:
    topology = Topology(spec["components"]["parameters"]["namespace"]["default"])
    addresses = {
        name: channel["address"].replace("{namespace}", topology.namespace)
        for name, channel in spec["channels"].items()
        if channel["address"]
    }
    assert addresses == {
        "requests": topology.requests,
        "replies": topology.replies,
        "deadLetters": topology.dead,
        "atlasCloud": "atlas.cloud",
    }
    assert spec["channels"]["deadLetters"]["bindings"]["amqp"]["exchange"]["type"] == "fanout"


def test_every_reference_resolves(spec: dict[str, Any]) -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(spec):
        node: Any = spec
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, ref
            node = node[part]


def test_request_schema_accepts_a_sample_and_refuses_what_the_model_refuses(spec: dict[str, Any]) -> None:
    requests = validator(spec, "InferenceRequest")
    requests.validate(samples.request("acme", "rca"))
    assert not requests.is_valid(samples.request("acme", "poem"))
    assert not requests.is_valid({k: v for k, v in samples.request().items() if k != "tenant_id"})


def test_reply_schema_accepts_what_the_worker_publishes(spec: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    reply = InferenceReply(
        request_id="r-1",
        tenant_id="acme",
        task="summary",
        status=Status.OK,
        timings=Timings(received_at=now, replied_at=now),
    )
    validator(spec, "InferenceReply").validate(reply.model_dump(mode="json", exclude_none=True))


def test_dead_letter_headers_name_the_headers_the_worker_writes(spec: dict[str, Any]) -> None:
    documented = spec["components"]["schemas"]["DeadLetterHeaders"]["properties"]
    assert {Header.REASON, Header.ERROR_CODE, Header.ATTEMPTS, Header.DEAD_LETTERED_AT} <= set(documented)


def test_the_documented_dead_letter_reasons_are_every_reason_the_worker_writes(spec: dict[str, Any]) -> None:
    reason = spec["components"]["schemas"]["DeadLetterHeaders"]["properties"][Header.REASON]
    assert set(reason["description"].split(" | ")) == {r.value for r in DeadLetterReason}

"""Through the broker, every sample incident gets a schema-valid RCA, a validated runbook and a summary."""

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from contracts.schema_export import SCHEMA_DIR
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from tests import fixtures
from tests.broker import BrokerClient, collect, json_body
from tests.conftest import RunningWorker
from tests.fakes.openai_server import FakeOpenAI
from tests.scene import tenants_reloaded

pytestmark = pytest.mark.broker
RCA_SCHEMA = json.loads((SCHEMA_DIR / "rca_result.schema.json").read_text())
REPLY_SCHEMA = json.loads((SCHEMA_DIR / "inference_reply.schema.json").read_text())
TOOL_SCHEMAS = {tool.name: tool.parameters for tool in DEFAULT_RUNBOOK_TOOLS}


def write_priced_tenant(directory: Path, base_url: str) -> None:
    (directory / "acme.toml").write_text(f"""
tenant_id = "acme"
[provider]
kind = "openai_compatible"
base_url = "{base_url}"
model = "fake-model"
api_key = "env:TEST_FAKE_OPENAI_KEY"
context_window = 32768
[pricing]
currency = "USD"
input_per_1k_tokens = 0.0025
output_per_1k_tokens = 0.01
""")


def incidents() -> dict[str, dict[str, Any]]:
    samples = {name: fixtures.incident(name) for name in fixtures.SAMPLE_INCIDENTS}
    return samples | {"big": fixtures.big_incident()}


async def test_each_sample_incident_yields_rca_runbook_and_summary(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path
) -> None:
    async with tenants_reloaded(worker.app):
        write_priced_tenant(tenants_dir, fake_openai.base_url)
    replies = await client.reply_queue()
    sent: dict[str, tuple[str, str]] = {}
    for name, incident in incidents().items():
        for task in ("rca", "runbook", "summary"):
            request_id = f"{name}-{task}"
            body = {"request_id": request_id, "tenant_id": "acme", "task": task, "incident": incident}
            await client.publish_request(body, reply_to=replies.name, correlation_id=request_id)
            sent[request_id] = (name, task)

    received = {json_body(m)["request_id"]: json_body(m) for m in await collect(replies, len(sent), timeout_s=60)}

    assert received.keys() == sent.keys()
    for request_id, (name, task) in sent.items():
        reply = received[request_id]
        jsonschema.validate(reply, REPLY_SCHEMA)
        assert reply["status"] == "ok", (request_id, reply["error"])
        assert reply["provenance"]["prompt_version"] == f"{task}/1"
        assert reply["usage"]["input_tokens"] > 0
        assert reply["usage"]["estimated_cost"] > 0
        assert reply["usage"]["currency"] == "USD"
        assert bool(reply["provenance"]["trimmed"]) is (name == "big"), request_id
        result = reply["result"]
        if task == "rca":
            jsonschema.validate(result["rca"], RCA_SCHEMA)
            assert result["rca"]["probable_causes"][0]["evidence"], request_id
        elif task == "runbook":
            assert result["tool_calls"], request_id
            for call in result["tool_calls"]:
                jsonschema.validate(call["arguments"], TOOL_SCHEMAS[call["name"]])
        else:
            assert result["text"], request_id

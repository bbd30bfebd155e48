"""Every provider kind, end to end over the broker: an RCA gets structured output, a runbook gets tool calls."""

from pathlib import Path

import pytest

from contracts import InferenceReply, Status
from tests import samples
from tests.broker import BrokerClient, collect, drain_now
from tests.conftest import RunningWorker
from tests.fakes.azure_openai_server import FakeAzureOpenAI
from tests.fakes.common import Fault
from tests.fakes.fixtures import AWS_SECRET, AZURE_KEY, AwsFakes, VertexFake, write_provider_tenant
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI
from tests.scene import tenants_reloaded

pytestmark = pytest.mark.broker
KINDS = ["azure_openai", "bedrock", "vertex", "ollama", "openai_compatible"]


@pytest.fixture
def urls(
    fake_azure: FakeAzureOpenAI,
    fake_aws: AwsFakes,
    fake_vertex: VertexFake,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> dict[str, str]:
    (tmp_path / "vertex-key.json").write_text(fake_vertex.service_account)
    return {
        "azure_openai": fake_azure.endpoint,
        "bedrock": fake_aws.bedrock.endpoint_url,
        "vertex": fake_vertex.fake.base_url,
        "ollama": fake_ollama.base_url,
        "openai_compatible": fake_openai.base_url,
    }


@pytest.mark.parametrize("kind", KINDS)
async def test_rca_and_runbook_are_answered_through_each_provider(
    kind: str,
    urls: dict[str, str],
    client: BrokerClient,
    worker: RunningWorker,
    tenants_dir: Path,
    tmp_path: Path,
    fake_vertex: VertexFake,
) -> None:
    async with tenants_reloaded(worker.app):
        write_provider_tenant(tenants_dir, "acme", kind, urls[kind], tmp_path / "vertex-key.json")
    replies = await client.reply_queue()
    rca, runbook = samples.request("acme", "rca"), samples.request("acme", "runbook")

    await client.publish_request(rca, reply_to=replies.name, correlation_id="rca")
    await client.publish_request(runbook, reply_to=replies.name, correlation_id="runbook")

    messages = {m.correlation_id: m for m in await collect(replies, 2)}
    rca_reply = InferenceReply.model_validate_json(messages["rca"].body)
    assert rca_reply.status is Status.OK, rca_reply.error
    assert rca_reply.result is not None
    assert rca_reply.result.rca is not None
    assert rca_reply.result.rca.probable_causes
    assert rca_reply.provenance.provider_kind == kind
    assert rca_reply.usage.input_tokens > 0
    assert rca_reply.usage.output_tokens > 0
    runbook_reply = InferenceReply.model_validate_json(messages["runbook"].body)
    assert runbook_reply.status is Status.OK, runbook_reply.error
    assert runbook_reply.result is not None
    assert runbook_reply.result.tool_calls
    assert runbook_reply.result.tool_calls[0].name == "run_diagnostic"
    for message in messages.values():
        for secret in (AZURE_KEY.encode(), AWS_SECRET.encode(), b"PRIVATE KEY"):
            assert secret not in message.body


@pytest.mark.parametrize("kind", KINDS[:4])
async def test_truncated_rca_fails_and_is_never_passed_on_as_a_result(
    kind: str,
    urls: dict[str, str],
    client: BrokerClient,
    worker: RunningWorker,
    tenants_dir: Path,
    tmp_path: Path,
    fake_azure: FakeAzureOpenAI,
    fake_aws: AwsFakes,
    fake_vertex: VertexFake,
    fake_ollama: FakeOllama,
) -> None:
    faults = {
        "azure_openai": fake_azure.faults,
        "bedrock": fake_aws.bedrock.faults,
        "vertex": fake_vertex.fake.faults,
        "ollama": fake_ollama.faults,
    }[kind]
    faults.always = Fault("truncated")
    async with tenants_reloaded(worker.app):
        write_provider_tenant(tenants_dir, "acme", kind, urls[kind], tmp_path / "vertex-key.json")
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme", "rca"), reply_to=replies.name)

    [message] = await collect(replies, 1)
    reply = InferenceReply.model_validate_json(message.body)
    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "truncated_output"
    assert reply.result is None or reply.result.rca is None


async def test_throttled_bedrock_tenant_with_fail_closed_gets_unavailable_with_the_reason(
    urls: dict[str, str],
    client: BrokerClient,
    worker: RunningWorker,
    tenants_dir: Path,
    tmp_path: Path,
    fake_aws: AwsFakes,
) -> None:
    fake_aws.bedrock.faults.always = Fault("rate_limit", 3)
    async with tenants_reloaded(worker.app):
        write_provider_tenant(tenants_dir, "acme", "bedrock", urls["bedrock"], tmp_path / "vertex-key.json")
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme", "summary"), reply_to=replies.name)

    [message] = await collect(replies, 1)
    reply = InferenceReply.model_validate_json(message.body)
    assert reply.status is Status.UNAVAILABLE
    assert reply.error is not None
    assert reply.error.error_class == "rate_limited"
    assert reply.error.retry_after_s == 3
    assert "ThrottlingException" in reply.error.message


async def test_vertex_tenant_on_a_palm_model_is_quarantined_and_told_to_move_to_gemini(
    urls: dict[str, str], client: BrokerClient, worker: RunningWorker, tenants_dir: Path, tmp_path: Path
) -> None:
    async with tenants_reloaded(worker.app):
        write_provider_tenant(
            tenants_dir, "acme", "vertex", urls["vertex"], tmp_path / "vertex-key.json", model='"chat-bison@002"'
        )
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme", "summary"), reply_to=replies.name)

    [message] = await collect(replies, 1)
    reply = InferenceReply.model_validate_json(message.body)
    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "tenant_config_invalid"
    assert "Gemini" in reply.error.message


async def test_azure_tenant_on_a_retired_api_version_is_quarantined_not_rerouted(
    urls: dict[str, str], client: BrokerClient, worker: RunningWorker, tenants_dir: Path, tmp_path: Path
) -> None:
    async with tenants_reloaded(worker.app):
        write_provider_tenant(
            tenants_dir, "acme", "azure_openai", urls["azure_openai"], tmp_path / "k", api_version='"2023-05-15"'
        )
    cloud = await client.bind_observer(worker.app.settings.atlas_cloud_exchange)
    replies = await client.reply_queue()

    await client.publish_request(samples.request("acme", "summary"), reply_to=replies.name)

    [message] = await collect(replies, 1)
    reply = InferenceReply.model_validate_json(message.body)
    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "tenant_config_invalid"
    assert await drain_now(cloud) == []

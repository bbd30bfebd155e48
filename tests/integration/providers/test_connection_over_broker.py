"""Test Connection as a request on the queue: stored and draft configs, and the drafts the worker refuses."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contracts import InferenceReply, Status, Topology
from tests.broker import BrokerClient, collect
from tests.conftest import RunningWorker, running_worker, worker_settings
from tests.fakes.azure_openai_server import FakeAzureOpenAI
from tests.fakes.fixtures import AWS_KEY_ID, AWS_SECRET, AZURE_KEY, AwsFakes, VertexFake, write_provider_tenant
from tests.fakes.hostile_server import HostileServer, redirect
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI
from tests.scene import Scene, open_scene, tenants_reloaded

pytestmark = pytest.mark.broker
# The fakes listen on loopback, which drafts from messages may reach only where the operator allows it.
LOOPBACK = ("127.0.0.0/8", "::1/128")


@pytest.fixture
async def worker(amqp_url: str, topology: Topology, tenants_dir: Path) -> AsyncIterator[RunningWorker]:
    async with running_worker(worker_settings(amqp_url, topology, tenants_dir, allow_draft_cidrs=LOOPBACK)) as running:
        yield running


@pytest.fixture
async def scene(
    amqp_url: str, topology: Topology, tenants_dir: Path, client: BrokerClient, fake_openai: FakeOpenAI
) -> AsyncIterator[Scene]:
    """The scene on a worker that lets drafts reach the loopback fakes."""
    async with open_scene(amqp_url, topology, tenants_dir, client, fake_openai, allow_draft_cidrs=LOOPBACK) as opened:
        yield opened


@pytest.fixture
async def default_worker(amqp_url: str, topology: Topology, tenants_dir: Path) -> AsyncIterator[RunningWorker]:
    """The worker as it starts without --allow-draft-cidr."""
    async with running_worker(worker_settings(amqp_url, topology, tenants_dir)) as running:
        yield running


def connection_request(tenant_id: str, provider: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": f"tc-{tenant_id}", "tenant_id": tenant_id, "task": "test_connection"}
    return body | ({"provider": provider} if provider is not None else {})


async def ask(client: BrokerClient, body: dict[str, Any]) -> tuple[InferenceReply, bytes]:
    replies = await client.reply_queue()
    await client.publish_request(body, reply_to=replies.name, correlation_id=body["request_id"])
    [message] = await collect(replies, 1, timeout_s=60)
    assert message.correlation_id == body["request_id"]
    return InferenceReply.model_validate_json(message.body), message.body


async def test_stored_config_is_tested_and_reported_on_the_reply_queue(
    client: BrokerClient, worker: RunningWorker, fake_ollama: FakeOllama, tenants_dir: Path, tmp_path: Path
) -> None:
    async with tenants_reloaded(worker.app):
        write_provider_tenant(tenants_dir, "acme", "ollama", fake_ollama.base_url, tmp_path / "unused.json")

    reply, _ = await ask(client, connection_request("acme"))

    assert reply.status is Status.OK
    assert reply.task == "test_connection"
    assert reply.result is not None
    report = reply.result.connection
    assert report is not None
    assert report.verdict == "ready"
    assert report.tool_calling == "yes"
    assert report.context_window == 131072
    assert reply.usage.input_tokens == report.input_tokens > 0


def drafts(
    fake_azure: FakeAzureOpenAI,
    fake_aws: AwsFakes,
    fake_vertex: VertexFake,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
) -> dict[str, dict[str, Any]]:
    return {
        "openai_compatible": {
            "kind": "openai_compatible",
            "base_url": fake_openai.base_url,
            "model": "fake-model",
            "api_key": "sk-test-fake",
        },
        "azure_openai": {
            "kind": "azure_openai",
            "endpoint": fake_azure.endpoint,
            "deployment": "gpt-4o",
            "api_key": AZURE_KEY,
        },
        "bedrock": {
            "kind": "bedrock",
            "region": "eu-central-1",
            "model_id": "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "access_key_id": AWS_KEY_ID,
            "secret_access_key": AWS_SECRET,
            "endpoint_url": fake_aws.bedrock.endpoint_url,
        },
        "vertex": {
            "kind": "vertex",
            "project": "acme-prod",
            "location": "europe-west4",
            "model": "gemini-2.5-flash",
            "service_account": fake_vertex.service_account,
            "base_url": fake_vertex.fake.base_url,
        },
        "ollama": {"kind": "ollama", "base_url": fake_ollama.base_url, "model": "llama3.1:8b"},
    }


@pytest.mark.parametrize("kind", ["azure_openai", "bedrock", "vertex", "ollama", "openai_compatible"])
async def test_draft_with_literal_secrets_is_tested_without_echoing_them_or_rerouting(
    kind: str,
    scene: Scene,
    fake_azure: FakeAzureOpenAI,
    fake_aws: AwsFakes,
    fake_vertex: VertexFake,
    fake_ollama: FakeOllama,
) -> None:
    draft = drafts(fake_azure, fake_aws, fake_vertex, fake_ollama, scene.fake)[kind]

    reply, raw = await ask(scene.client, connection_request("newco", draft))  # newco has no stored config yet
    await scene.settled("tc-newco")

    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.connection is not None
    assert reply.result.connection.authenticated is True
    assert reply.result.connection.tool_calling == "yes"
    assert reply.result.connection.structured_output == "schema"
    for secret in (AZURE_KEY, AWS_SECRET, "PRIVATE KEY", "sk-test-fake"):
        assert secret.encode() not in raw
    assert (await scene.leftovers()).cloud == []


@pytest.mark.parametrize(
    ("provider", "code"),
    [
        (
            {"kind": "openai_compatible", "base_url": "{ollama}/v1", "model": "m", "api_key": "env:AMQP_URL"},
            "secret_reference_refused",
        ),
        (
            {"kind": "azure_openai", "endpoint": "{ollama}", "deployment": "d", "api_key": "file:/etc/shadow"},
            "secret_reference_refused",
        ),
        ({"kind": "ollama", "base_url": "http://169.254.169.254/latest", "model": "m"}, "endpoint_refused"),
        ({"kind": "ollama", "base_url": "http://[fe80::a9fe:a9fe]:80", "model": "m"}, "endpoint_refused"),
        ({"kind": "ollama", "base_url": "http://0.0.0.0:{ollama_port}", "model": "m"}, "endpoint_refused"),
        ({"kind": "ollama", "base_url": "http://[::ffff:0.0.0.0]:{ollama_port}", "model": "m"}, "endpoint_refused"),
        ({"kind": "ollama", "base_url": "http://0177.0.0.1:{ollama_port}", "model": "m"}, "endpoint_refused"),
    ],
    ids=["env-reference", "file-reference", "metadata-address", "link-local-v6", "unspecified", "mapped", "octal"],
)
async def test_draft_that_could_read_secrets_or_probe_the_network_is_rejected(
    provider: dict[str, Any], code: str, client: BrokerClient, worker: RunningWorker, fake_ollama: FakeOllama
) -> None:
    port = fake_ollama.base_url.rsplit(":", 1)[1]
    provider = {
        k: v.replace("{ollama}", fake_ollama.base_url).replace("{ollama_port}", port) for k, v in provider.items()
    }

    reply, raw = await ask(client, connection_request("newco", provider))

    assert reply.status is Status.REJECTED
    assert reply.error is not None
    assert reply.error.code == code
    assert reply.result is None
    assert fake_ollama.requests == []
    assert b"guest:guest" not in raw


async def test_tenant_without_config_and_without_draft_is_rejected(client: BrokerClient, worker: RunningWorker) -> None:
    reply, _ = await ask(client, connection_request("globex"))

    assert reply.status is Status.REJECTED
    assert reply.error is not None
    assert reply.error.code == "no_provider_config"


async def test_draft_to_loopback_is_refused_unless_the_operator_allows_it(
    client: BrokerClient, default_worker: RunningWorker, fake_ollama: FakeOllama
) -> None:
    provider = {"kind": "ollama", "base_url": fake_ollama.base_url, "model": "llama3.1:8b"}

    reply, _ = await ask(client, connection_request("newco", provider))

    assert reply.status is Status.REJECTED
    assert reply.error is not None
    assert reply.error.code == "endpoint_refused"
    assert "loopback" in reply.error.message
    assert fake_ollama.requests == []


async def test_draft_redirecting_to_a_refused_address_names_the_redirect_and_never_reaches_it(
    client: BrokerClient, worker: RunningWorker
) -> None:
    target = await HostileServer(host="0.0.0.0").start()
    redirector = await HostileServer().start()
    redirector.response = redirect(307, f"http://0.0.0.0:{target.port}/v1/chat/completions")
    provider = {"kind": "openai_compatible", "base_url": f"{redirector.url()}/v1", "model": "m", "api_key": "sk-x1"}
    try:
        reply, raw = await ask(client, connection_request("newco", provider))
    finally:
        await redirector.close()
        await target.close()

    assert reply.status is Status.OK
    assert reply.result is not None
    report = reply.result.connection
    assert report is not None
    assert report.verdict == "not_ready"
    [check] = [c for c in report.checks if c.requirement == "connection"]
    assert "redirecting to http://0.0.0.0:" in check.message
    assert b"body of the redirect" not in raw
    assert target.hits == []

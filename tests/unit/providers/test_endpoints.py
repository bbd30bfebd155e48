"""The endpoints Test Connection's guard checks are the ones each provider actually calls."""

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pydantic import TypeAdapter

from contracts.tenant import ProviderSettings
from tests.fakes.azure_openai_server import FakeAzureOpenAI
from tests.fakes.fixtures import EXTERNAL_ID, ROLE_ARN, AwsFakes, VertexFake
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI
from tests.unit.providers.calls import call_for
from worker.providers.bounded import within
from worker.providers.pool import build_provider, endpoints
from worker.providers.vertex import VertexProvider

PROVIDER_SETTINGS: TypeAdapter[ProviderSettings] = TypeAdapter(ProviderSettings)


@pytest.fixture
async def called() -> AsyncIterator[tuple[aiohttp.ClientSession, list[str]]]:
    """A session that records the URL of every request sent through it."""
    urls: list[str] = []

    async def on_start(_: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestStartParams) -> None:
        urls.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace], trust_env=False) as session:
        yield session, urls


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.close()


async def assert_calls_only_its_endpoints(
    config: dict[str, Any], called: tuple[aiohttp.ClientSession, list[str]]
) -> None:
    session, urls = called
    settings = PROVIDER_SETTINGS.validate_python(config)
    listed = endpoints(settings)
    provider = build_provider(settings, session)
    call = call_for("summary", config)
    await within(call.timeout_s, provider.endpoint, provider.complete(call))

    assert urls, "the provider sent nothing"
    assert all(any(url.startswith(e) for e in listed) for url in urls), (urls, listed)
    assert {e for e in listed if any(url.startswith(e) for url in urls)} == set(listed), (urls, listed)


async def test_openai_compatible(fake_openai: FakeOpenAI, called: tuple[aiohttp.ClientSession, list[str]]) -> None:
    config = {"kind": "openai_compatible", "base_url": fake_openai.base_url, "model": fake_openai.model}
    await assert_calls_only_its_endpoints(config | {"api_key": "sk-test-fake"}, called)


async def test_azure_openai(fake_azure: FakeAzureOpenAI, called: tuple[aiohttp.ClientSession, list[str]]) -> None:
    config = {
        "kind": "azure_openai",
        "endpoint": fake_azure.endpoint,
        "deployment": "gpt-4o",
        "api_version": "2024-10-21",
        "api_key": "env:TEST_AZURE_KEY",
    }
    await assert_calls_only_its_endpoints(config, called)


async def test_ollama(fake_ollama: FakeOllama, called: tuple[aiohttp.ClientSession, list[str]]) -> None:
    config = {"kind": "ollama", "base_url": fake_ollama.base_url, "model": "llama3.1:8b"}
    await assert_calls_only_its_endpoints(config, called)


async def test_bedrock_with_an_assumed_role_calls_sts_and_bedrock(
    fake_aws: AwsFakes, called: tuple[aiohttp.ClientSession, list[str]]
) -> None:
    config = {
        "kind": "bedrock",
        "region": "eu-central-1",
        "model_id": "anthropic.claude-3-5-sonnet-20240620-v1:0",
        "access_key_id": "env:TEST_AWS_KEY_ID",
        "secret_access_key": "env:TEST_AWS_SECRET",
        "role_arn": ROLE_ARN,
        "external_id": EXTERNAL_ID,
        "endpoint_url": fake_aws.bedrock.endpoint_url,
        "sts_endpoint_url": fake_aws.sts.endpoint_url,
    }
    await assert_calls_only_its_endpoints(config, called)


async def test_vertex_calls_the_api_and_the_keys_token_endpoint(
    fake_vertex: VertexFake, called: tuple[aiohttp.ClientSession, list[str]]
) -> None:
    config = {
        "kind": "vertex",
        "project": "acme-prod",
        "location": "europe-west4",
        "model": "gemini-2.5-flash",
        "service_account": fake_vertex.service_account,  # literal, as a Test Connection message carries it
        "base_url": fake_vertex.fake.base_url,
    }
    await assert_calls_only_its_endpoints(config, called)


@pytest.mark.parametrize(
    ("location", "host"),
    [
        ("global", "https://aiplatform.googleapis.com"),
        ("europe-west4", "https://europe-west4-aiplatform.googleapis.com"),
    ],
)
async def test_vertex_location_host_is_the_same_for_the_guard_and_the_provider(
    location: str, host: str, tmp_path: Path
) -> None:
    config = {"kind": "vertex", "project": "p", "location": location, "model": "gemini-2.5-flash"}
    settings = PROVIDER_SETTINGS.validate_python(config | {"service_account": "{}"})
    async with aiohttp.ClientSession() as session:
        provider = build_provider(settings, session)
    assert isinstance(provider, VertexProvider)
    assert endpoints(settings) == [host]
    assert provider.endpoint == host


@pytest.mark.parametrize(
    ("region", "runtime", "sts"),
    [
        (
            "eu-central-1",
            "https://bedrock-runtime.eu-central-1.amazonaws.com",
            "https://sts.eu-central-1.amazonaws.com",
        ),
        (
            "cn-north-1",
            "https://bedrock-runtime.cn-north-1.amazonaws.com.cn",
            "https://sts.cn-north-1.amazonaws.com.cn",
        ),
    ],
)
def test_bedrock_default_hosts_follow_the_region(region: str, runtime: str, sts: str) -> None:
    config = {"kind": "bedrock", "region": region, "model_id": "amazon.nova-pro-v1:0", "role_arn": ROLE_ARN}
    assert endpoints(PROVIDER_SETTINGS.validate_python(config)) == [runtime, sts]

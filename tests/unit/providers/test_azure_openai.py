"""Azure OpenAI against its strict fake: URL, api-version, api-key, structured output, tools, every error class."""

import dataclasses

import aiohttp
import pytest
from pydantic import ValidationError

from contracts import AzureOpenAISettings, RcaResult
from tests.fakes.azure_openai_server import FakeAzureOpenAI
from tests.fakes.common import Fault
from tests.unit.providers.calls import call_for
from worker.errors import ErrorClass, ProviderError
from worker.providers.azure_openai import AzureOpenAIProvider
from worker.providers.base import Finish
from worker.providers.bounded import within


def settings(fake: FakeAzureOpenAI, **overrides: str) -> dict[str, str]:
    return {
        "kind": "azure_openai",
        "endpoint": fake.endpoint,
        "deployment": "gpt-4o",
        "api_version": "2024-10-21",
        "api_key": "env:TEST_AZURE_KEY",
    } | overrides


def provider(fake: FakeAzureOpenAI, session: aiohttp.ClientSession, **overrides: str) -> AzureOpenAIProvider:
    return AzureOpenAIProvider(AzureOpenAISettings.model_validate(settings(fake, **overrides)), session)


async def test_rca_uses_json_schema_and_returns_a_valid_rca(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession
) -> None:
    result = await provider(fake_azure, session).complete(call_for("rca", settings(fake_azure)))

    body = fake_azure.requests[0]
    assert fake_azure.api_versions == ["2024-10-21"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["max_completion_tokens"] == 2048
    assert "max_tokens" not in body
    assert result.finish is Finish.STOP
    assert result.model == "gpt-4o-2024-08-06"
    assert result.input_tokens > 0
    assert result.output_tokens > 0
    RcaResult.model_validate_json(result.text or "")


async def test_runbook_returns_tool_calls_with_parsed_arguments(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession
) -> None:
    result = await provider(fake_azure, session).complete(call_for("runbook", settings(fake_azure)))

    assert fake_azure.requests[0]["tool_choice"] == "required"
    assert result.finish is Finish.TOOL_CALLS
    assert result.tool_calls
    assert all(isinstance(c.arguments, dict) for c in result.tool_calls)
    assert result.tool_calls[0].name == "run_diagnostic"


async def test_preview_version_before_json_schema_uses_json_mode_with_schema_in_prompt(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession
) -> None:
    azure = provider(fake_azure, session, api_version="2024-02-15-preview")

    result = await azure.complete(call_for("rca", settings(fake_azure)))

    body = fake_azure.requests[0]
    assert body["response_format"] == {"type": "json_object"}
    assert "max_tokens" in body
    assert "max_completion_tokens" not in body
    assert "JSON Schema" in body["messages"][0]["content"]
    assert azure.structured_output == "json_mode"
    RcaResult.model_validate_json(result.text or "")


def test_api_version_older_than_supported_is_a_config_error_naming_the_minimum() -> None:
    with pytest.raises(ValidationError, match="older than 2024-02-15-preview"):
        AzureOpenAISettings.model_validate(
            {
                "kind": "azure_openai",
                "endpoint": "https://x/",
                "deployment": "d",
                "api_key": "k",
                "api_version": "2023-05-15",
            }
        )


async def test_wrong_key_is_auth_and_says_check_the_api_key(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_AZURE_KEY", "wrong-key")

    with pytest.raises(ProviderError) as caught:
        await provider(fake_azure, session).complete(call_for("summary", settings(fake_azure)))

    assert caught.value.error_class is ErrorClass.AUTH
    assert "check the API key" in caught.value.message
    assert "wrong-key" not in caught.value.message


async def test_unknown_deployment_is_not_found(fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider(fake_azure, session, deployment="gpt-5").complete(call_for("summary", settings(fake_azure)))

    assert caught.value.error_class is ErrorClass.NOT_FOUND
    assert caught.value.code == "deployment_not_found"


@pytest.mark.parametrize(
    ("fault", "error_class", "code"),
    [
        (Fault("rate_limit", 6), ErrorClass.RATE_LIMITED, "rate_limited"),
        (Fault("server_error"), ErrorClass.TRANSIENT, "provider_unavailable"),
        (Fault("content_filter_prompt"), ErrorClass.CONTENT_FILTERED, "content_filtered"),
        (Fault("context_overflow"), ErrorClass.CONTEXT_OVERFLOW, "context_overflow"),
        (Fault("malformed"), ErrorClass.TRANSIENT, "malformed_response"),
        (Fault("hang"), ErrorClass.TRANSIENT, "timeout"),
    ],
)
async def test_errors_are_classified(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession, fault: Fault, error_class: ErrorClass, code: str
) -> None:
    fake_azure.faults.push(fault)
    call = dataclasses.replace(call_for("summary", settings(fake_azure)), timeout_s=0.5 if fault.kind == "hang" else 30)

    tested = provider(fake_azure, session)
    with pytest.raises(ProviderError) as caught:
        await within(call.timeout_s, tested.endpoint, tested.complete(call))  # as the pool bounds it

    assert (caught.value.error_class, caught.value.code) == (error_class, code)


async def test_rate_limit_honours_retry_after_ms_before_retry_after(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession
) -> None:
    fake_azure.faults.push(Fault("rate_limit", 2.5))  # retry-after-ms: 2500, retry-after: 3

    with pytest.raises(ProviderError) as caught:
        await provider(fake_azure, session).complete(call_for("summary", settings(fake_azure)))

    assert caught.value.retry_after_s == 2.5


async def test_completion_blocked_with_http_200_is_a_content_filter_finish(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession
) -> None:
    fake_azure.faults.push(Fault("content_filter"))

    result = await provider(fake_azure, session).complete(call_for("summary", settings(fake_azure)))

    assert result.finish is Finish.CONTENT_FILTER


async def test_truncated_structured_answer_finishes_with_length(
    fake_azure: FakeAzureOpenAI, session: aiohttp.ClientSession
) -> None:
    fake_azure.faults.push(Fault("truncated"))

    result = await provider(fake_azure, session).complete(call_for("rca", settings(fake_azure)))

    assert result.finish is Finish.LENGTH

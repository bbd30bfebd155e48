"""Ollama's native API against its strict fake: /api/chat shape, format, tools, discovery, every error class."""

import dataclasses

import aiohttp
import pytest

from contracts import OllamaSettings, RcaResult
from tests.fakes.common import Fault
from tests.fakes.ollama_server import FakeOllama
from tests.unit.providers.calls import call_for
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish
from worker.providers.bounded import within
from worker.providers.ollama import OllamaProvider


def settings(fake: FakeOllama, **overrides: object) -> dict[str, object]:
    return {"kind": "ollama", "base_url": fake.base_url, "model": "llama3.1:8b", "context_window": 32768} | overrides


def provider(fake: FakeOllama, session: aiohttp.ClientSession, **overrides: object) -> OllamaProvider:
    return OllamaProvider(OllamaSettings.model_validate(settings(fake, **overrides)), session)


async def test_rca_sends_the_schema_as_format_without_streaming(
    fake_ollama: FakeOllama, session: aiohttp.ClientSession
) -> None:
    result = await provider(fake_ollama, session).complete(call_for("rca", settings(fake_ollama)))

    body = fake_ollama.requests[0]
    assert body["stream"] is False
    assert "probable_causes" in body["format"]["properties"]
    assert body["options"] == {"num_predict": 2048, "num_ctx": 32768}
    assert body["messages"][0]["role"] == "system"
    assert "tool_choice" not in body
    assert result.input_tokens > 0
    assert result.output_tokens > 0
    RcaResult.model_validate_json(result.text or "")


async def test_runbook_returns_tool_calls_with_object_arguments(
    fake_ollama: FakeOllama, session: aiohttp.ClientSession
) -> None:
    result = await provider(fake_ollama, session).complete(call_for("runbook", settings(fake_ollama)))

    assert {t["function"]["name"] for t in fake_ollama.requests[0]["tools"]} >= {"run_diagnostic", "page_team"}
    assert result.finish is Finish.TOOL_CALLS  # Ollama itself says "stop"
    assert result.tool_calls[0].name == "run_diagnostic"
    assert result.tool_calls[0].arguments["service"]


async def test_model_without_tools_capability_is_tools_unsupported(
    fake_ollama: FakeOllama, session: aiohttp.ClientSession
) -> None:
    fake_ollama.capabilities = ["completion"]

    with pytest.raises(ProviderError) as caught:
        await provider(fake_ollama, session).complete(call_for("runbook", settings(fake_ollama)))

    assert (caught.value.error_class, caught.value.code) == (ErrorClass.BAD_REQUEST, "tools_unsupported")


async def test_model_not_pulled_says_how_to_pull_it(fake_ollama: FakeOllama, session: aiohttp.ClientSession) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider(fake_ollama, session, model="qwen2.5:72b").complete(call_for("summary", settings(fake_ollama)))

    assert caught.value.error_class is ErrorClass.NOT_FOUND
    assert "ollama pull qwen2.5:72b" in caught.value.message


async def test_describe_reads_tags_and_show(fake_ollama: FakeOllama, session: aiohttp.ClientSession) -> None:
    info = await provider(fake_ollama, session).describe()
    assert (info.found, info.context_window, info.tools) == (True, 131072, True)
    assert info.context_source is not None
    assert "context_length" in info.context_source

    fake_ollama.num_ctx = 8192
    assert (await provider(fake_ollama, session).describe()).context_window == 8192

    assert (await provider(fake_ollama, session, model="absent").describe()).found is False


@pytest.mark.parametrize(
    ("fault", "error_class", "code"),
    [
        (Fault("rate_limit", 3), ErrorClass.RATE_LIMITED, "rate_limited"),
        (Fault("server_error"), ErrorClass.TRANSIENT, "provider_unavailable"),
        (Fault("malformed"), ErrorClass.TRANSIENT, "malformed_response"),
        (Fault("hang"), ErrorClass.TRANSIENT, "timeout"),
    ],
)
async def test_errors_are_classified(
    fake_ollama: FakeOllama, session: aiohttp.ClientSession, fault: Fault, error_class: ErrorClass, code: str
) -> None:
    fake_ollama.faults.push(fault)
    call = dataclasses.replace(
        call_for("summary", settings(fake_ollama)), timeout_s=0.5 if fault.kind == "hang" else 30
    )

    tested = provider(fake_ollama, session)
    with pytest.raises(ProviderError) as caught:
        await within(call.timeout_s, tested.endpoint, tested.complete(call))  # as the pool bounds it

    assert (caught.value.error_class, caught.value.code) == (error_class, code)
    if fault.kind == "rate_limit":
        assert caught.value.retry_after_s == 3


async def test_truncated_structured_answer_finishes_with_length(
    fake_ollama: FakeOllama, session: aiohttp.ClientSession
) -> None:
    fake_ollama.faults.push(Fault("truncated"))

    result = await provider(fake_ollama, session).complete(call_for("rca", settings(fake_ollama)))

    assert result.finish is Finish.LENGTH

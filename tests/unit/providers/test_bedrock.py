"""Bedrock Converse through aioboto3 against SigV4-checking fakes: keys, assumed roles, families, every error class."""

import dataclasses
from datetime import timedelta

import aiohttp
import pytest

from contracts import BedrockSettings, RcaResult, ToolCall
from tests.fakes.common import Fault
from tests.fakes.fixtures import AWS_KEY_ID, EXTERNAL_ID, ROLE_ARN, AwsFakes
from tests.unit.providers.calls import call_for
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish, Turn
from worker.providers.bedrock import BedrockProvider, family_of
from worker.providers.bounded import within

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"


def settings(aws: AwsFakes, **overrides: object) -> dict[str, object]:
    return {
        "kind": "bedrock",
        "region": "eu-central-1",
        "model_id": CLAUDE,
        "access_key_id": "env:TEST_AWS_KEY_ID",
        "secret_access_key": "env:TEST_AWS_SECRET",
        "endpoint_url": aws.bedrock.endpoint_url,
    } | overrides


def role_settings(aws: AwsFakes, **overrides: object) -> dict[str, object]:
    base = settings(aws, role_arn=ROLE_ARN, external_id=EXTERNAL_ID, sts_endpoint_url=aws.sts.endpoint_url)
    del base["access_key_id"], base["secret_access_key"]
    return base | overrides


def provider(config: dict[str, object], session: aiohttp.ClientSession) -> BedrockProvider:
    return BedrockProvider(BedrockSettings.model_validate(config), session)


async def test_rca_is_a_forced_tool_whose_input_is_the_structured_answer(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    result = await provider(settings(fake_aws), session).complete(call_for("rca", settings(fake_aws)))

    body = fake_aws.bedrock.requests[0]
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "rca_result"}}
    assert body["system"][0]["text"].startswith("You are a senior site reliability engineer")
    assert body["inferenceConfig"]["maxTokens"] == 2048
    assert fake_aws.bedrock.access_keys_seen == [AWS_KEY_ID]
    assert result.finish is Finish.STOP
    assert not result.tool_calls
    assert result.input_tokens > 0
    assert result.output_tokens > 0
    RcaResult.model_validate_json(result.text or "")


async def test_runbook_returns_tool_use_blocks_as_tool_calls(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    result = await provider(settings(fake_aws), session).complete(call_for("runbook", settings(fake_aws)))

    assert fake_aws.bedrock.requests[0]["toolConfig"]["toolChoice"] == {"any": {}}
    assert result.finish is Finish.TOOL_CALLS
    assert result.tool_calls[0].name == "run_diagnostic"
    assert result.tool_calls[0].id == "tooluse_0"


async def test_assumed_role_signs_with_session_credentials_and_reuses_them(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    bedrock = provider(role_settings(fake_aws), session)
    call = call_for("summary", role_settings(fake_aws))

    await bedrock.complete(call)
    await bedrock.complete(call)

    [assumed] = fake_aws.sts.assumed
    assert assumed["RoleArn"] == ROLE_ARN
    assert assumed["ExternalId"] == EXTERNAL_ID
    assert fake_aws.bedrock.access_keys_seen == ["ASIAFAKE00000000", "ASIAFAKE00000000"]


async def test_assumed_role_close_to_expiry_is_assumed_again(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    fake_aws.sts.lifetime = timedelta(minutes=4)  # inside the refresh margin from the start
    bedrock = provider(role_settings(fake_aws), session)
    call = call_for("summary", role_settings(fake_aws))

    await bedrock.complete(call)
    await bedrock.complete(call)

    assert len(fake_aws.sts.assumed) == 2
    assert fake_aws.bedrock.access_keys_seen == ["ASIAFAKE00000000", "ASIAFAKE00000001"]


async def test_role_refusing_the_external_id_is_an_auth_error(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    config = role_settings(fake_aws, external_id="someone-else")

    with pytest.raises(ProviderError) as caught:
        await provider(config, session).complete(call_for("summary", config))

    assert (caught.value.error_class, caught.value.code) == (ErrorClass.AUTH, "assume_role_failed")
    assert "external_id" in caught.value.message


async def test_wrong_secret_fails_the_signature_check_as_auth(
    fake_aws: AwsFakes, monkeypatch: pytest.MonkeyPatch, session: aiohttp.ClientSession
) -> None:
    monkeypatch.setenv("TEST_AWS_SECRET", "not-the-secret")

    with pytest.raises(ProviderError) as caught:
        await provider(settings(fake_aws), session).complete(call_for("summary", settings(fake_aws)))

    assert caught.value.error_class is ErrorClass.AUTH
    assert "not-the-secret" not in caught.value.message


async def test_signature_for_another_region_is_refused(fake_aws: AwsFakes, session: aiohttp.ClientSession) -> None:
    config = settings(fake_aws, region="us-east-1")

    with pytest.raises(ProviderError) as caught:
        await provider(config, session).complete(call_for("summary", config))

    assert caught.value.error_class is ErrorClass.AUTH


async def test_titan_gets_its_system_prompt_in_the_first_turn_and_json_by_prompt(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    config = settings(fake_aws, model_id="amazon.titan-text-express-v1")
    titan = provider(config, session)

    await titan.complete(call_for("rca", config))

    body = fake_aws.bedrock.requests[0]
    assert "system" not in body
    assert "toolConfig" not in body
    assert "JSON Schema" in body["messages"][0]["content"][0]["text"]
    assert titan.structured_output == "none"


async def test_titan_asked_for_tools_fails_clearly_without_calling(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    config = settings(fake_aws, model_id="amazon.titan-text-express-v1")

    with pytest.raises(ProviderError) as caught:
        await provider(config, session).complete(call_for("runbook", config))

    assert (caught.value.error_class, caught.value.code) == (ErrorClass.BAD_REQUEST, "tools_unsupported")
    assert "Titan" in caught.value.message
    assert fake_aws.bedrock.requests == []


async def test_llama_3_1_gets_tools_without_a_forced_choice(fake_aws: AwsFakes, session: aiohttp.ClientSession) -> None:
    config = settings(fake_aws, model_id="meta.llama3-1-70b-instruct-v1:0")

    result = await provider(config, session).complete(call_for("runbook", config))

    assert "toolChoice" not in fake_aws.bedrock.requests[0]["toolConfig"]
    assert result.tool_calls


def test_families_are_recognised_through_profiles_and_arns() -> None:
    assert family_of("eu.anthropic.claude-3-7-sonnet-20250219-v1:0").tool_choice == "tool"
    arn = "arn:aws:bedrock:eu-central-1:111122223333:inference-profile/eu.amazon.nova-pro-v1:0"
    assert family_of(arn).name == "Amazon Nova"
    assert family_of("meta.llama3-70b-instruct-v1:0").tools is False
    assert family_of("mistral.mistral-7b-instruct-v0:2").system_prompt is False


@pytest.mark.parametrize(
    ("fault", "error_class", "code"),
    [
        (Fault("rate_limit", 2), ErrorClass.RATE_LIMITED, "rate_limited"),
        (Fault("model_not_ready"), ErrorClass.RATE_LIMITED, "rate_limited"),
        (Fault("server_error"), ErrorClass.TRANSIENT, "provider_unavailable"),
        (Fault("forbidden"), ErrorClass.AUTH, "forbidden"),
        (Fault("quota"), ErrorClass.QUOTA, "quota_exceeded"),
        (Fault("context_overflow"), ErrorClass.CONTEXT_OVERFLOW, "context_overflow"),
        (Fault("malformed"), ErrorClass.TRANSIENT, "malformed_response"),
        (Fault("hang"), ErrorClass.TRANSIENT, "timeout"),
    ],
)
async def test_errors_are_classified(
    fake_aws: AwsFakes, fault: Fault, error_class: ErrorClass, code: str, session: aiohttp.ClientSession
) -> None:
    fake_aws.bedrock.faults.push(fault)
    call = dataclasses.replace(call_for("summary", settings(fake_aws)), timeout_s=3 if fault.kind == "hang" else 30)

    tested = provider(settings(fake_aws), session)
    with pytest.raises(ProviderError) as caught:
        await within(call.timeout_s, tested.endpoint, tested.complete(call))  # as the pool bounds it

    assert (caught.value.error_class, caught.value.code) == (error_class, code)
    if fault.kind == "rate_limit":
        assert caught.value.retry_after_s == 2
    assert len(fake_aws.bedrock.requests) == 1  # botocore made no retries of its own


async def test_truncated_structured_answer_finishes_with_length(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    fake_aws.bedrock.faults.push(Fault("truncated"))

    result = await provider(settings(fake_aws), session).complete(call_for("rca", settings(fake_aws)))

    assert result.finish is Finish.LENGTH


async def test_guardrail_intervention_is_a_content_filter_finish(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    fake_aws.bedrock.faults.push(Fault("content_filter"))

    result = await provider(settings(fake_aws), session).complete(call_for("summary", settings(fake_aws)))

    assert result.finish is Finish.CONTENT_FILTER


async def test_tool_results_of_parallel_calls_share_one_user_turn(
    fake_aws: AwsFakes, session: aiohttp.ClientSession
) -> None:
    calls = (ToolCall(id="t1", name="run_diagnostic", arguments={}), ToolCall(id="t2", name="page_team", arguments={}))
    call = dataclasses.replace(
        call_for("summary", settings(fake_aws)),
        turns=(
            Turn("user", "The checkout API is failing."),
            Turn("assistant", "", tool_calls=calls),
            Turn("tool", '{"output": "pool exhausted"}', tool_call_id="t1"),
            Turn("tool", '{"paged": true}', tool_call_id="t2"),
        ),
    )

    await provider(settings(fake_aws), session).complete(call)

    roles = [m["role"] for m in fake_aws.bedrock.requests[0]["messages"]]
    assert roles == ["user", "assistant", "user"]
    results = fake_aws.bedrock.requests[0]["messages"][2]["content"]
    assert [b["toolResult"]["toolUseId"] for b in results] == ["t1", "t2"]


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [(Fault("rate_limit"), ErrorClass.RATE_LIMITED), (Fault("server_error"), ErrorClass.TRANSIENT)],
)
async def test_sts_failures_while_assuming_the_role_are_classified(
    fake_aws: AwsFakes, fault: Fault, error_class: ErrorClass, session: aiohttp.ClientSession
) -> None:
    fake_aws.sts.faults.push(fault)

    with pytest.raises(ProviderError) as caught:
        await provider(role_settings(fake_aws), session).complete(call_for("summary", role_settings(fake_aws)))

    assert caught.value.error_class is error_class
    assert fake_aws.bedrock.requests == []


async def test_unknown_model_id_is_not_found(fake_aws: AwsFakes, session: aiohttp.ClientSession) -> None:
    config = settings(fake_aws, model_id="anthropic.claude-9-opus")

    with pytest.raises(ProviderError) as caught:
        await provider(config, session).complete(call_for("summary", config))

    assert (caught.value.error_class, caught.value.code) == (ErrorClass.NOT_FOUND, "model_not_found")

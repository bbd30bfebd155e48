"""Incident tasks end to end through the handler, over real HTTP to the strict fake OpenAI server (no broker)."""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from contracts import InferenceReply, InferenceRequest, Status, TenantConfig
from contracts.tools import DEFAULT_RUNBOOK_TOOLS
from tests import fixtures
from tests.fakes.openai_server import FakeOpenAI, Fault, chat_completion
from worker.errors import ErrorClass, ProviderError
from worker.handling.handler import Handler
from worker.handling.ladder import RetryLadder
from worker.handling.outcome import DeliveryContext, Reply
from worker.prompting.prompts import build_call
from worker.prompting.results import explain_provider_error
from worker.providers.egress import EgressPolicy, egress_session
from worker.providers.pool import ProviderPool

Ask = Callable[..., Awaitable[Reply]]
VALID_RCA: dict[str, Any] = {
    "summary": "Deploy v2.41.0 leaks database sessions; the pool runs dry and checkout requests time out.",
    "probable_causes": [
        {
            "title": "Session leak in OrderRepository.reserve_inventory",
            "description": "Sessions are not returned to the pool after the deploy.",
            "confidence": 0.8,
            "evidence": [
                {"kind": "deploy", "index": 1, "note": "the deploy"},
                {"kind": "log", "index": 2, "note": "leak"},
            ],
        }
    ],
    "impact": "23% of checkouts fail.",
    "remediation": [{"action": "Roll back checkout-api to v2.40.3", "rationale": "Removes the leak.", "risk": "low"}],
    "follow_ups": ["Do not allow skipping the canary stage"],
}


def tenant(base_url: str, **provider: Any) -> TenantConfig:
    return TenantConfig.model_validate(
        {
            "tenant_id": "acme",
            "provider": {
                "kind": "openai_compatible",
                "base_url": base_url,
                "model": "fake-model",
                "api_key": "env:TEST_FAKE_OPENAI_KEY",
            }
            | provider,
            "pricing": {"currency": "EUR", "input_per_1k_tokens": 0.0025, "output_per_1k_tokens": 0.01},
        }
    )


@pytest.fixture
async def ask(fake_openai: FakeOpenAI) -> AsyncIterator[Ask]:
    """Handle one request for tenant acme (provider: the fake) and return the reply outcome."""
    async with egress_session(EgressPolicy()) as session:

        async def handle(task: str, incident: str = "db-pool-exhaustion", **fields: Any) -> Reply:
            config = tenant(fake_openai.base_url, **fields.pop("provider", {}))
            handler = Handler(ProviderPool(session), RetryLadder())
            body = {"request_id": "r-1", "tenant_id": "acme", "task": task} | fields
            if task != "chat":
                body["incident"] = fixtures.big_incident() if incident == "big" else fixtures.incident(incident)
            request = InferenceRequest.model_validate(body)
            outcome = await handler.handle(config, request, DeliveryContext(0, datetime.now(UTC), time.monotonic()))
            assert isinstance(outcome, Reply)
            assert outcome.reply is not None
            return outcome

        yield handle


def reply_of(outcome: Reply) -> InferenceReply:
    assert outcome.reply is not None
    return outcome.reply


def user_turns(request_body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request_body["messages"] if m["role"] == "user"]


async def test_valid_rca_is_accepted_with_usage_cost_and_prompt_version(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.replies = deque([chat_completion(orjson.dumps(VALID_RCA).decode(), usage=(1200, 300))])

    reply = reply_of(await ask("rca"))

    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.rca is not None
    assert reply.result.rca.probable_causes[0].evidence[0].kind == "deploy"
    assert reply.provenance.prompt_version == "rca/1"
    assert reply.provenance.model_calls == 1
    assert reply.provenance.repaired is False
    assert reply.provenance.trimmed == {}
    assert reply.provenance.context_window == 32768  # not configured: the documented default
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (1200, 300)
    assert reply.usage.estimated_cost == pytest.approx(0.006)  # 1.2 * 0.0025 + 0.3 * 0.01
    assert reply.usage.currency == "EUR"
    sent = fake_openai.requests[0]
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["schema"]["additionalProperties"] is False


async def test_invalid_json_is_repaired_once_and_usage_sums_both_calls(ask: Ask, fake_openai: FakeOpenAI) -> None:
    broken = '{"summary": "pool exhausted", "probable_causes": [{"title": "leak"'
    fake_openai.replies = deque(
        [
            chat_completion(broken, usage=(1000, 20)),
            chat_completion(orjson.dumps(VALID_RCA).decode(), usage=(1100, 250)),
        ]
    )

    reply = reply_of(await ask("rca"))

    assert reply.status is Status.OK
    assert reply.provenance.repaired is True
    assert reply.provenance.model_calls == 2
    assert reply.provenance.prompt_version == "rca/1+repair/1"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (2100, 270)
    assert reply.usage.estimated_cost == pytest.approx(2.1 * 0.0025 + 0.27 * 0.01)
    repair = fake_openai.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": broken}
    assert "cannot be used" in repair[-1]["content"]
    assert "Invalid JSON" in repair[-1]["content"]
    assert repair[:-2] == fake_openai.requests[0]["messages"]


async def test_output_still_invalid_after_the_repair_fails_with_raw_text_kept(
    ask: Ask, fake_openai: FakeOpenAI
) -> None:
    fake_openai.replies = deque([chat_completion("The root cause is the deploy."), chat_completion('{"summary": ""}')])

    outcome = await ask("rca")
    reply = reply_of(outcome)

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "invalid_output"
    assert reply.result is not None
    assert reply.result.rca is None
    assert reply.result.raw_output == '{"summary": ""}'
    assert reply.provenance.model_calls == 2
    assert reply.provenance.repaired is True
    assert len(fake_openai.requests) == 2  # exactly one repair attempt
    assert outcome.dead_letter is None  # answered; nothing for an operator to replay


async def test_evidence_pointing_outside_the_incident_is_invalid_output(ask: Ask, fake_openai: FakeOpenAI) -> None:
    made_up = VALID_RCA | {
        "probable_causes": [VALID_RCA["probable_causes"][0] | {"evidence": [{"kind": "log", "index": 99, "note": "?"}]}]
    }
    fake_openai.replies = deque([chat_completion(orjson.dumps(made_up).decode())] * 2)

    reply = reply_of(await ask("rca"))

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "invalid_output"
    assert "[log 99]" in reply.error.message
    assert "10 log item(s)" in reply.error.message
    assert "[log 99]" in user_turns(fake_openai.requests[1])[-1]  # the repair said what was wrong


async def test_truncated_output_gets_a_shorter_retry_then_fails_as_truncated(ask: Ask, fake_openai: FakeOpenAI) -> None:
    cut = orjson.dumps(VALID_RCA).decode()[:120]
    fake_openai.replies = deque([chat_completion(cut, finish_reason="length")] * 2)

    reply = reply_of(await ask("rca"))

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "truncated_output"
    assert reply.result is not None
    assert reply.result.raw_output == cut
    repair = fake_openai.requests[1]["messages"]
    assert "cut off" in repair[-1]["content"]
    assert all(m["role"] != "assistant" for m in repair)  # the cut-off text is not sent back


async def test_rca_returned_as_a_forced_tool_call_is_accepted(ask: Ask, fake_openai: FakeOpenAI) -> None:
    # Providers without a JSON-schema mode ask for structured output as one forced tool call.
    fake_openai.replies = deque([chat_completion(tool_calls=[("rca_result", VALID_RCA)])])

    reply = reply_of(await ask("rca"))

    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.rca is not None
    assert reply.result.rca.summary == VALID_RCA["summary"]


async def test_content_filtered_answer_is_not_repaired(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.replies = deque([chat_completion("", finish_reason="content_filter")])

    reply = reply_of(await ask("rca"))

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "content_filtered"
    assert len(fake_openai.requests) == 1


async def test_runbook_tool_calls_come_back_in_order_and_validated(ask: Ask, fake_openai: FakeOpenAI) -> None:
    calls = [
        ("run_diagnostic", {"service": "checkout-api", "command": "pg_stat_activity", "purpose": "count sessions"}),
        ("rollback_deploy", {"service": "checkout-api", "to_version": "v2.40.3", "reason": "session leak"}),
        ("page_team", {"team": "checkout", "message": "rolled back", "urgency": "low"}),
    ]
    fake_openai.replies = deque([chat_completion(tool_calls=calls)])

    reply = reply_of(await ask("runbook"))

    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.tool_calls is not None
    assert [(c.name, c.arguments) for c in reply.result.tool_calls] == calls
    assert reply.provenance.prompt_version == "runbook/1"
    sent = fake_openai.requests[0]
    assert [t["function"]["name"] for t in sent["tools"]] == [t.name for t in DEFAULT_RUNBOOK_TOOLS]
    assert sent["tool_choice"] == "required"


async def test_runbook_uses_the_request_tools_and_rejects_arguments_that_break_them(
    ask: Ask, fake_openai: FakeOpenAI
) -> None:
    tools = [
        {
            "name": "drain_node",
            "description": "Cordon and drain a Kubernetes node.",
            "parameters": {
                "type": "object",
                "properties": {"node": {"type": "string"}, "grace_s": {"type": "integer", "minimum": 0}},
                "required": ["node", "grace_s"],
            },
        }
    ]
    ok = reply_of(await ask("runbook", "node-memory-pressure", tools=tools))
    fake_openai.replies = deque([chat_completion(tool_calls=[("drain_node", {"node": "ip-10-2-7-14", "grace_s": -5})])])
    bad = reply_of(await ask("runbook", "node-memory-pressure", tools=tools))

    assert ok.status is Status.OK
    assert ok.result is not None
    assert ok.result.tool_calls is not None
    assert [c.name for c in ok.result.tool_calls] == ["drain_node"]
    assert [t["function"]["name"] for t in fake_openai.requests[0]["tools"]] == ["drain_node"]
    assert bad.status is Status.FAILED
    assert bad.error is not None
    assert bad.error.code == "invalid_output"
    assert "grace_s" in bad.error.message
    assert "minimum" in bad.error.message
    assert bad.result is not None
    assert bad.result.raw_output is not None
    assert "ip-10-2-7-14" in bad.result.raw_output


async def test_runbook_calling_an_undeclared_tool_is_invalid_output(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.replies = deque([chat_completion(tool_calls=[("delete_database", {"name": "orders-db"})])])

    reply = reply_of(await ask("runbook"))

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "invalid_output"
    assert "undeclared tool 'delete_database'" in reply.error.message


async def test_model_answering_a_runbook_in_prose_is_refused(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.tools = "ignored"

    reply = reply_of(await ask("runbook"))

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "tools_unsupported"
    assert "tool calling" in reply.error.message
    assert reply.result is not None
    assert reply.result.tool_calls is None
    assert reply.result.raw_output  # the prose is kept for diagnosis, never passed on as a runbook


async def test_provider_without_tool_calling_gets_a_clear_failed_reply(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.tools = "rejected"

    outcome = await ask("runbook")
    reply = reply_of(outcome)

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "tools_unsupported"
    assert reply.error.error_class == "bad_request"
    assert "runbooks need a model with tool calling" in reply.error.message
    assert reply.result is None
    assert len(fake_openai.requests) == 1  # the same call would fail the same way: never retried
    assert outcome.dead_letter is not None


async def test_invalid_tool_declarations_are_rejected_without_calling_the_model(
    ask: Ask, fake_openai: FakeOpenAI
) -> None:
    tools = [{"name": "noop", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}]

    outcome = await ask("runbook", tools=tools)
    reply = reply_of(outcome)

    assert reply.status is Status.REJECTED
    assert reply.error is not None
    assert reply.error.code == "invalid_tools"
    assert fake_openai.requests == []
    assert outcome.dead_letter is not None
    assert outcome.dead_letter.reason == "malformed"


async def test_summary_is_text(ask: Ask, fake_openai: FakeOpenAI) -> None:
    reply = reply_of(await ask("summary", "tls-certificate-expired"))

    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.text
    assert "payments-gateway cannot reach acquirer" in reply.result.text
    assert reply.provenance.prompt_version == "summary/1"
    assert "response_format" not in fake_openai.requests[0]
    assert "tools" not in fake_openai.requests[0]


async def test_chat_passes_the_callers_messages_through(ask: Ask, fake_openai: FakeOpenAI) -> None:
    messages = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Which service failed first?"},
        {"role": "assistant", "content": "orders-db."},
        {"role": "user", "content": "And why?"},
    ]

    reply = reply_of(await ask("chat", messages=messages))

    assert reply.status is Status.OK
    assert reply.provenance.prompt_version == "chat/1"
    assert fake_openai.requests[0]["messages"] == messages


async def test_big_incident_is_trimmed_to_the_configured_window(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.context_window = 32768

    reply = reply_of(await ask("summary", "big"))

    assert reply.status is Status.OK
    assert reply.provenance.model_calls == 1
    assert reply.provenance.trimmed["logs"] > 3000
    prompt = user_turns(fake_openai.requests[0])[0]
    assert "[alert 0]" in prompt
    assert "[alert 1]" in prompt
    assert "[timeline 0]" in prompt
    # The newest WARN line survives the INFO noise, under its position in the request.
    assert "[log 3978] 2026-11-27T11:12:36Z WARN" in prompt
    assert "[log 3999]" not in prompt


async def test_context_overflow_is_retried_once_with_the_window_the_provider_reported(
    ask: Ask, fake_openai: FakeOpenAI
) -> None:
    fake_openai.context_window = 12000  # the tenant config claims 32K

    reply = reply_of(await ask("rca", "big", provider={"context_window": 32768}))

    assert reply.status is Status.OK
    assert len(fake_openai.requests) == 2
    assert reply.provenance.model_calls == 2
    assert reply.provenance.context_window == 12000
    first, second = (len(user_turns(r)[0]) for r in fake_openai.requests)
    assert second < first
    assert reply.result is not None
    assert reply.result.rca is not None


async def test_context_overflow_twice_fails_after_exactly_one_retry(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.context_window = 300  # smaller than the parts that are never trimmed

    outcome = await ask("summary", "big")
    reply = reply_of(outcome)

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "context_overflow"
    assert len(fake_openai.requests) == 2
    assert reply.provenance.model_calls == 2
    assert reply.provenance.trimmed["summary_chars"] > 0


async def test_chat_that_overflows_is_not_retried_unchanged(ask: Ask, fake_openai: FakeOpenAI) -> None:
    fake_openai.always = Fault("context_overflow")  # "maximum context length is 8192 tokens"

    reply = reply_of(await ask("chat", messages=[{"role": "user", "content": "why?"}]))

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "context_overflow"
    assert len(fake_openai.requests) == 1  # nothing to trim, so a retry would be the same call


@pytest.mark.parametrize(
    "message",
    [
        "400 from Ollama: registry.ollama.ai/library/gemma:2b does not support tools",
        "400 from Bedrock: ValidationException: This model doesn't support tool use.",
        "400 from Vertex: Function calling is not enabled for models/gemini-pro-vision",
        '400 from vLLM: "auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
    ],
)
def test_providers_refusing_tools_are_recognised(message: str) -> None:
    request = InferenceRequest.model_validate(
        {
            "request_id": "r",
            "tenant_id": "acme",
            "task": "runbook",
            "incident": fixtures.incident("tls-certificate-expired"),
        }
    )

    explained = explain_provider_error(request, ProviderError(ErrorClass.BAD_REQUEST, message))

    assert explained.code == "tools_unsupported"
    assert explained.error_class is ErrorClass.BAD_REQUEST


async def test_a_large_request_is_rendered_off_the_event_loop(fake_openai: FakeOpenAI) -> None:
    incident = fixtures.incident("db-pool-exhaustion")
    incident["metrics"] = [{"name": f"series-{n}"} for n in range(16000)]  # ~300 KB of tiny series
    request = InferenceRequest.model_validate(
        {"request_id": "r-1", "tenant_id": "acme", "task": "summary", "incident": incident}
    )
    config = tenant(fake_openai.base_url)
    started = time.perf_counter()
    build_call(request, config)
    rendering_s = time.perf_counter() - started  # what it would hold the loop for, measured in this run
    worst_lag_s = 0.0

    async def watch_the_loop() -> None:
        nonlocal worst_lag_s
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst_lag_s = max(worst_lag_s, time.perf_counter() - before - 0.001)

    watcher = asyncio.create_task(watch_the_loop())
    await asyncio.sleep(0.01)
    async with egress_session(EgressPolicy()) as session:
        ctx = DeliveryContext(0, datetime.now(UTC), time.monotonic(), body_bytes=len(request.model_dump_json()))
        outcome = await Handler(ProviderPool(session), RetryLadder()).handle(config, request, ctx)
    watcher.cancel()

    assert isinstance(outcome, Reply)
    assert reply_of(outcome).status is Status.OK
    # On the loop, the worst lag would be the whole rendering; half of it leaves room for preemption by a busy host.
    assert worst_lag_s < rendering_s / 2, (worst_lag_s, rendering_s)

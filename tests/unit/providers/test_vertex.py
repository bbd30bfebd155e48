"""Vertex AI Gemini against its strict fake: service-account token flow, request shape, tools, every error class."""

import asyncio
import concurrent.futures
import dataclasses
import threading
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from contracts import RcaResult, VertexSettings
from tests.fakes.common import Fault
from tests.fakes.fixtures import VertexFake, rsa_key
from tests.fakes.vertex_server import service_account_json
from tests.integration.test_process_lifecycle import wait_until
from tests.ops.scrape import free_port
from tests.unit.providers.calls import call_for
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import Finish
from worker.providers.bounded import within
from worker.providers.vertex import VertexProvider, gemini_schema


def settings(vertex: VertexFake, key_file: Path, **overrides: object) -> dict[str, object]:
    key_file.write_text(vertex.service_account)
    return {
        "kind": "vertex",
        "project": "acme-prod",
        "location": "europe-west4",
        "model": "gemini-2.5-flash",
        "service_account": f"file:{key_file}",
        "base_url": vertex.fake.base_url,
    } | overrides


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "vertex-key.json"


def provider(vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession, **overrides: object) -> VertexProvider:
    return VertexProvider(VertexSettings.model_validate(settings(vertex, key_file, **overrides)), session)


async def test_rca_gets_a_token_then_asks_for_json_with_the_schema(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    result = await provider(fake_vertex, key_file, session).complete(call_for("rca", settings(fake_vertex, key_file)))

    assert fake_vertex.fake.tokens_issued == ["ya29.fake-0"]
    body = fake_vertex.fake.requests[0]
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert "probable_causes" in body["generationConfig"]["responseJsonSchema"]["properties"]
    assert body["systemInstruction"]["parts"][0]["text"].startswith("You are a senior site reliability engineer")
    assert result.model == "gemini-2.5-flash-001"
    assert result.input_tokens > 0
    assert result.output_tokens > 0
    RcaResult.model_validate_json(result.text or "")


async def test_runbook_forces_function_calling_and_returns_tool_calls(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    result = await provider(fake_vertex, key_file, session).complete(
        call_for("runbook", settings(fake_vertex, key_file))
    )

    body = fake_vertex.fake.requests[0]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert "parametersJsonSchema" in body["tools"][0]["functionDeclarations"][0]
    assert result.finish is Finish.TOOL_CALLS
    assert result.tool_calls[0].name == "run_diagnostic"


async def test_token_is_cached_and_shared_by_concurrent_calls(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    vertex = provider(fake_vertex, key_file, session)
    call = call_for("summary", settings(fake_vertex, key_file))

    await asyncio.gather(*(vertex.complete(call) for _ in range(5)))
    await vertex.complete(call)

    assert len(fake_vertex.fake.tokens_issued) == 1
    assert len(fake_vertex.fake.requests) == 6


async def test_revoked_token_is_refreshed_once_and_the_call_succeeds(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    vertex = provider(fake_vertex, key_file, session)
    call = call_for("summary", settings(fake_vertex, key_file))
    await vertex.complete(call)
    fake_vertex.fake.revoke_all()

    result = await vertex.complete(call)

    assert result.text
    assert len(fake_vertex.fake.tokens_issued) == 2


async def test_key_not_matching_the_accounts_public_key_is_auth(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    impostor = dataclasses.replace(
        fake_vertex, service_account=service_account_json(rsa_key(1), fake_vertex.fake.token_uri)
    )

    with pytest.raises(ProviderError) as caught:
        await provider(impostor, key_file, session).complete(call_for("summary", settings(impostor, key_file)))

    assert caught.value.error_class is ErrorClass.AUTH
    assert "Invalid JWT Signature" in caught.value.message
    assert fake_vertex.fake.tokens_issued == []


async def test_a_key_larger_than_a_service_account_key_is_refused_before_it_is_loaded(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    # Validating an RSA key holds the GIL for a time that grows with its size (34 s for 16,384 bits here): a
    # draft from a message could stall every tenant with one. Service-account keys are 2048-bit.
    big = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    oversized = dataclasses.replace(fake_vertex, service_account=service_account_json(big, fake_vertex.fake.token_uri))

    with pytest.raises(ProviderError) as caught:
        await provider(oversized, key_file, session).complete(call_for("summary", settings(oversized, key_file)))

    assert caught.value.code == "service_account_invalid"
    assert "2048-bit" in caught.value.message
    assert fake_vertex.fake.tokens_issued == []
    assert fake_vertex.fake.requests == []


async def test_token_refreshes_at_a_tarpit_hold_neither_the_shared_threads_nor_the_endpoint_past_the_call(
    fake_vertex: VertexFake, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # Eight drafts (the probe cap) whose token endpoint never answers: each refresh waits in a thread of its
    # own, and the call's timeout ends the token request too instead of leaving it for its own 30 s. The shared
    # pool gets eight threads, as on a machine of four cores: eight refreshes in it would leave none free.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    hung, released = asyncio.Event(), asyncio.Event()
    waiting = 0

    async def tarpit(request: web.Request) -> web.Response:
        nonlocal waiting
        waiting += 1
        if waiting == 8:
            hung.set()
        try:
            await asyncio.sleep(3600)
        finally:
            waiting -= 1
            if waiting == 0:
                released.set()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/token", tarpit)
    runner = web.AppRunner(app, handler_cancellation=True)  # a client that goes away ends its handler
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    tarpit_account = dataclasses.replace(
        fake_vertex, service_account=service_account_json(rsa_key(0), f"http://127.0.0.1:{port}/token")
    )
    providers = [provider(tarpit_account, tmp_path / f"key-{n}.json", session) for n in range(8)]
    call = call_for("summary", settings(tarpit_account, tmp_path / "key-0.json"))
    try:
        calls = [asyncio.create_task(within(2.0, "vertex", p.complete(call))) for p in providers]
        await asyncio.wait_for(hung.wait(), 10)

        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1) == "free"  # the shared pool is not held
        results = await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.wait_for(released.wait(), 5)  # every token request cut short with its call
    finally:
        for p in providers:
            await p.aclose()
        await runner.cleanup()

    assert all(isinstance(r, ProviderError) and r.error_class is ErrorClass.TRANSIENT for r in results)


async def test_a_token_refresh_cut_short_does_not_retry_after_its_call_has_ended(
    fake_vertex: VertexFake, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # google-auth retries a 503 after sleeping in its thread; once the call is over, that retry must not be sent.
    seen: list[float] = []

    async def unavailable_then_tarpit(request: web.Request) -> web.Response:
        seen.append(asyncio.get_running_loop().time())
        if len(seen) == 1:
            return web.json_response({"error": "unavailable"}, status=503)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/token", unavailable_then_tarpit)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    account = dataclasses.replace(
        fake_vertex, service_account=service_account_json(rsa_key(0), f"http://127.0.0.1:{port}/token")
    )
    cut_short = provider(account, tmp_path / "key.json", session)
    try:
        with pytest.raises(ProviderError):
            await within(0.3, "vertex", cut_short.complete(call_for("summary", settings(account, tmp_path / "k.json"))))
        await cut_short.aclose()

        def refreshing() -> bool:
            return any(t.name.startswith("atlas-token") for t in threading.enumerate())

        await wait_until(lambda: not refreshing(), 10)  # the thread ended after google-auth's back-off
    finally:
        await runner.cleanup()

    assert len(seen) == 1


def test_palm_model_is_refused_as_retired(fake_vertex: VertexFake, key_file: Path) -> None:
    with pytest.raises(ValidationError, match=r"retired.*Gemini"):
        VertexSettings.model_validate(settings(fake_vertex, key_file, model="text-bison@002"))


async def test_unknown_model_is_not_found(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider(fake_vertex, key_file, session, model="gemini-9").complete(
            call_for("summary", settings(fake_vertex, key_file))
        )

    assert caught.value.error_class is ErrorClass.NOT_FOUND


@pytest.mark.parametrize(
    ("fault", "error_class", "code"),
    [
        (Fault("rate_limit", 4), ErrorClass.RATE_LIMITED, "rate_limited"),
        (Fault("server_error"), ErrorClass.TRANSIENT, "provider_unavailable"),
        (Fault("forbidden"), ErrorClass.AUTH, "forbidden"),
        (Fault("context_overflow"), ErrorClass.CONTEXT_OVERFLOW, "context_overflow"),
        (Fault("malformed"), ErrorClass.TRANSIENT, "malformed_response"),
        (Fault("hang"), ErrorClass.TRANSIENT, "timeout"),
    ],
)
async def test_errors_are_classified(
    fake_vertex: VertexFake,
    key_file: Path,
    session: aiohttp.ClientSession,
    fault: Fault,
    error_class: ErrorClass,
    code: str,
) -> None:
    fake_vertex.fake.faults.push(fault)
    call = dataclasses.replace(
        call_for("summary", settings(fake_vertex, key_file)), timeout_s=0.5 if fault.kind == "hang" else 30
    )

    tested = provider(fake_vertex, key_file, session)
    with pytest.raises(ProviderError) as caught:
        await within(call.timeout_s, tested.endpoint, tested.complete(call))  # as the pool bounds it

    assert (caught.value.error_class, caught.value.code) == (error_class, code)
    if fault.kind == "rate_limit":
        assert caught.value.retry_after_s == 4


@pytest.mark.parametrize(
    ("fault", "finish"),
    [
        (Fault("truncated"), Finish.LENGTH),
        (Fault("content_filter"), Finish.CONTENT_FILTER),
        (Fault("content_filter_prompt"), Finish.CONTENT_FILTER),
    ],
)
async def test_http_200_endings_are_reported_as_finish(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession, fault: Fault, finish: Finish
) -> None:
    fake_vertex.fake.faults.push(fault)

    result = await provider(fake_vertex, key_file, session).complete(call_for("rca", settings(fake_vertex, key_file)))

    assert result.finish is finish


async def test_rotated_key_file_is_used_at_the_next_refresh_without_a_restart(
    fake_vertex: VertexFake, key_file: Path, session: aiohttp.ClientSession
) -> None:
    vertex = provider(fake_vertex, key_file, session)
    call = call_for("summary", settings(fake_vertex, key_file))
    await vertex.complete(call)
    rotated = rsa_key(2)
    await asyncio.to_thread(key_file.write_text, service_account_json(rotated, fake_vertex.fake.token_uri))
    fake_vertex.fake.public_key = rotated.public_key()  # the old key is deleted in IAM
    fake_vertex.fake.revoke_all()

    result = await vertex.complete(call)

    assert result.text
    assert len(fake_vertex.fake.tokens_issued) == 2


def test_schemas_are_cut_to_the_keywords_vertex_supports() -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 500, "minLength": 1},
            "cause": {"$ref": "#/$defs/Cause", "description": "the likeliest"},
        },
        "$defs": {"Cause": {"type": "object", "properties": {"pattern": {"type": "string", "pattern": "^a"}}}},
        "required": ["title"],
    }

    assert gemini_schema(schema) == {
        "type": "object",
        "properties": {"title": {"type": "string"}, "cause": {"$ref": "#/$defs/Cause"}},
        "$defs": {"Cause": {"type": "object", "properties": {"pattern": {"type": "string"}}}},
        "required": ["title"],
    }

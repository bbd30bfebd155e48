"""The egress policy on every HTTP stack: refused addresses are never reached, redirects never followed,
answers capped before and after decompression. Every connection stays on loopback (0.0.0.0 lands there)."""

import resource
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from contracts import AzureOpenAISettings, BedrockSettings, OpenAICompatibleSettings, VertexSettings
from tests.fakes.fixtures import AWS_KEY_ID, AWS_SECRET, rsa_key
from tests.fakes.hostile_server import (
    CannedResponse,
    HostileServer,
    gzip_bomb,
    gzip_response,
    gzipped_json,
    json_response,
    redirect,
)
from tests.fakes.vertex_server import service_account_json
from worker.errors import ErrorClass, ProviderError
from worker.providers.azure_openai import AzureOpenAIProvider
from worker.providers.base import ModelCall, Provider, Turn
from worker.providers.bedrock import BedrockProvider
from worker.providers.egress import EgressPolicy, egress_session
from worker.providers.openai_compatible import OpenAICompatibleProvider
from worker.providers.vertex import VertexProvider

STORED = EgressPolicy()
DRAFT = EgressPolicy(drafts=True)
CALL = ModelCall(system="s", turns=(Turn("user", "ping"),), max_output_tokens=16, timeout_s=10)
CHAT_ANSWER = {
    "id": "c",
    "model": "fake-model",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "OK"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
}


# --- the address classifier ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "stored_refused", "draft_refused"),
    [
        ("169.254.169.254", True, True),
        ("::ffff:169.254.169.254", True, True),
        ("::ffff:a9fe:a9fe", True, True),
        ("64:ff9b::a9fe:a9fe", True, True),
        ("64:ff9b::169.254.169.254", True, True),
        ("2002:a9fe:a9fe::", True, True),  # 6to4
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", True, True),  # Teredo
        ("::169.254.169.254", True, True),  # IPv4-compatible
        ("::7f00:1", True, True),  # IPv4-compatible 127.0.0.1
        ("fd00:ec2::254", True, True),
        ("168.63.129.16", True, True),  # Azure WireServer
        ("100.100.100.200", True, True),  # Alibaba
        ("169.254.170.2", True, True),
        ("169.254.1.1", True, True),
        ("fe80::1", True, True),
        ("fe80::1%eth0", True, True),
        ("0.0.0.0", True, True),
        ("::", True, True),
        ("::ffff:0.0.0.0", True, True),
        ("224.0.0.1", True, True),
        ("255.255.255.255", True, True),
        ("0177.0.0.1", True, True),  # not canonical: never parsed as 127.0.0.1
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("10.1.2.3", False, True),
        ("192.168.1.10", False, True),
        ("100.64.0.1", False, True),  # carrier-grade NAT
        ("fd12:3456::1", False, True),  # unique local
        ("8.8.8.8", False, False),
        ("2606:4700:4700::1111", False, False),
        ("64:ff9b::808:808", False, False),  # NAT64 to a public address
        ("64:ff9b:1::808:808", False, True),  # local-use NAT64: where its IPv4 host sits is the network's choice
        ("64:ff9b:1::a9fe:a9fe", True, True),  # local-use NAT64 /96 to the metadata service
        ("64:ff9b:1:a9fe:00a9:fe00::", True, True),  # the same in the /48 layout (bits 64-71 skipped)
        ("64:ff9b:1:00:7f:0:1::", False, True),  # 127.0.0.0 in the /64 layout: loopback, a stored one may
    ],
)
def test_address_classifier(address: str, stored_refused: bool, draft_refused: bool) -> None:
    assert (STORED.refusal(address) is not None) is stored_refused
    assert (DRAFT.refusal(address) is not None) is draft_refused


@pytest.mark.parametrize(
    "host",
    [
        "0177.0.0.1",
        "2130706433",
        "0x7f.1",
        "0xa9fea9fe",
        "169.254.169.254.",
        "metadata.google.internal",
        "METADATA.GOOGLE.INTERNAL.",
        "[::ffff:169.254.169.254]",
        "[::ffff:0.0.0.0]",
    ],
)
def test_hosts_in_legacy_notations_or_naming_metadata_are_refused_for_every_profile(host: str) -> None:
    assert STORED.host_refusal(host) is not None
    assert DRAFT.host_refusal(host) is not None


def test_draft_cidr_allowance_opens_private_ranges_but_never_metadata_or_unspecified() -> None:
    allowed = EgressPolicy.for_drafts(["127.0.0.0/8", "10.0.0.0/8", "169.254.0.0/16", "0.0.0.0/0"])

    assert allowed.refusal("127.0.0.1") is None
    assert allowed.refusal("10.9.8.7") is None
    assert allowed.refusal("192.168.1.1") is None  # inside 0.0.0.0/0
    assert allowed.refusal("169.254.169.254") is not None
    assert allowed.refusal("0.0.0.0") is not None
    assert DRAFT.refusal("10.9.8.7") is not None


# --- the HTTP stacks ----------------------------------------------------------------------------------------


@pytest.fixture
async def recorder() -> AsyncIterator[HostileServer]:
    """Listens on 0.0.0.0: a connection there lands on loopback, so a refused connection would show as a hit."""
    server = await HostileServer(json_response(CHAT_ANSWER), host="0.0.0.0").start()
    yield server
    await server.close()


@pytest.fixture
async def hostile() -> AsyncIterator[HostileServer]:
    server = await HostileServer().start()
    yield server
    await server.close()


@pytest.fixture
async def stored_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with egress_session(STORED) as session:
        yield session


def openai(url: str, session: aiohttp.ClientSession) -> Provider:
    settings = OpenAICompatibleSettings(kind="openai_compatible", base_url=f"{url}/v1", model="fake-model")
    return OpenAICompatibleProvider(settings, session)


async def failure(provider: Provider) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.complete(CALL)
    return caught.value


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_to_a_refused_address_is_named_not_followed(
    status: int, hostile: HostileServer, recorder: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    hostile.response = redirect(status, f"http://user:hunter2@0.0.0.0:{recorder.port}/v1/chat?sig=s3cr3t")

    error = await failure(openai(hostile.url(), stored_session))

    assert error.code == "redirect_refused"
    assert f"http://0.0.0.0:{recorder.port}/v1/chat" in error.message
    assert "hunter2" not in error.message
    assert "s3cr3t" not in error.message
    assert "body of the redirect" not in error.message
    assert recorder.hits == []
    assert len(hostile.hits) == 1


async def test_azure_api_key_never_travels_to_another_origin(
    hostile: HostileServer, recorder: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    # localhost is allowed for stored tenants: only the no-redirect rule keeps the key at its own origin.
    hostile.response = redirect(307, f"http://localhost:{recorder.port}/openai/deployments/d/chat/completions")
    settings = AzureOpenAISettings(
        kind="azure_openai", endpoint=hostile.url(), deployment="d", api_key="azure-secret-key"
    )

    error = await failure(AzureOpenAIProvider(settings, stored_session))

    assert error.code == "redirect_refused"
    assert f"localhost:{recorder.port}" in error.message
    assert recorder.hits == []
    assert hostile.hits[0].headers["api-key"] == "azure-secret-key"


@pytest.mark.parametrize("host", ["0.0.0.0", "[::ffff:0.0.0.0]"])
async def test_ip_literal_endpoint_is_refused_on_the_connection_itself(
    host: str, recorder: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    error = await failure(openai(recorder.url(host), stored_session))

    assert error.code == "egress_refused"
    assert "egress policy refuses" in error.message
    assert recorder.hits == []


async def test_draft_session_refuses_loopback_unless_its_range_is_allowed(hostile: HostileServer) -> None:
    hostile.response = json_response(CHAT_ANSWER)
    async with egress_session(DRAFT) as session:
        error = await failure(openai(hostile.url(), session))
    async with egress_session(EgressPolicy.for_drafts(["127.0.0.0/8"])) as session:
        result = await openai(hostile.url(), session).complete(CALL)

    assert error.code == "egress_refused"
    assert "loopback" in error.message
    assert result.text == "OK"
    assert len(hostile.hits) == 1


async def test_gzip_bomb_stops_at_the_cap_without_inflating_into_memory(hostile: HostileServer) -> None:
    hostile.response = gzip_response(gzip_bomb())
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with egress_session(STORED) as session:
        error = await failure(openai(hostile.url(), session))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib) / 1024

    assert error.code == "provider_response_too_large"
    assert error.error_class is ErrorClass.BAD_REQUEST
    assert "8388608 bytes" in error.message
    assert grown_mib < 64  # the whole inflated body would be 256 MiB


async def test_declared_length_over_the_cap_is_refused_before_reading(hostile: HostileServer) -> None:
    hostile.response = CannedResponse(200, {"Content-Type": "application/json"}, b"{}", declared_length=10**12)
    async with egress_session(EgressPolicy(max_response_bytes=1024)) as session:
        error = await failure(openai(hostile.url(), session))

    assert error.code == "provider_response_too_large"
    assert "1024 bytes" in error.message


async def test_answers_under_the_cap_still_decompress(hostile: HostileServer) -> None:
    hostile.response = gzipped_json(CHAT_ANSWER)
    async with egress_session(EgressPolicy(max_response_bytes=4096)) as session:
        result = await openai(hostile.url(), session).complete(CALL)

    assert result.text == "OK"


# --- Vertex: the token refresh goes through the same session ------------------------------------------------


def vertex(token_uri: str, session: aiohttp.ClientSession, base_url: str = "http://127.0.0.1:9") -> Provider:
    settings = VertexSettings.model_validate(
        {
            "kind": "vertex",
            "project": "acme-prod",
            "location": "europe-west4",
            "model": "gemini-2.5-flash",
            "base_url": base_url,
            "service_account": service_account_json(rsa_key(), token_uri),
        }
    )
    return VertexProvider(settings, session)


async def test_vertex_token_uri_redirect_is_named_not_followed(
    hostile: HostileServer, recorder: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    hostile.response = redirect(302, f"http://0.0.0.0:{recorder.port}/token")

    error = await failure(vertex(f"{hostile.url()}/token", stored_session))

    assert error.code == "redirect_refused"
    assert "token endpoint" in error.message
    assert f"0.0.0.0:{recorder.port}/token" in error.message
    assert recorder.hits == []


async def test_vertex_token_uri_at_a_refused_address_is_never_reached(
    recorder: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    error = await failure(vertex(f"{recorder.url('0.0.0.0')}/token", stored_session))

    assert error.code == "egress_refused"
    assert recorder.hits == []


async def test_vertex_token_name_that_does_not_resolve_is_unreachable(stored_session: aiohttp.ClientSession) -> None:
    error = await failure(vertex("http://token.invalid/token", stored_session))

    assert error.code == "unreachable"
    assert error.error_class is ErrorClass.TRANSIENT


async def test_vertex_token_error_body_is_not_echoed_whole(
    hostile: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    hostile.response = json_response({"error": "invalid_grant", "error_description": "x" * 100_000}, status=400)

    error = await failure(vertex(f"{hostile.url()}/token", stored_session))

    assert error.code == "unauthorized"
    assert "invalid_grant" in error.message
    assert len(error.message) < 500


# --- Bedrock and STS: aiobotocore sends through the same session --------------------------------------------


def bedrock(session: aiohttp.ClientSession, **urls: str) -> Provider:
    keys: dict[str, Any] = {"access_key_id": AWS_KEY_ID, "secret_access_key": AWS_SECRET}
    if "sts_endpoint_url" in urls:
        keys["role_arn"] = "arn:aws:iam::111122223333:role/atlas-bedrock"
    settings = BedrockSettings.model_validate(
        {"kind": "bedrock", "region": "eu-central-1", "model_id": "anthropic.claude-3-5-sonnet-20240620-v1:0"}
        | keys
        | urls
    )
    return BedrockProvider(settings, session)


@pytest.mark.parametrize("which", ["endpoint_url", "sts_endpoint_url"])
async def test_bedrock_and_sts_redirects_are_named_not_followed(
    which: str, hostile: HostileServer, recorder: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    hostile.response = redirect(307, f"http://0.0.0.0:{recorder.port}/")
    urls = {"endpoint_url": recorder.url("0.0.0.0"), which: hostile.url()}

    error = await failure(bedrock(stored_session, **urls))

    assert error.code == "redirect_refused"
    assert f"0.0.0.0:{recorder.port}" in error.message
    assert recorder.hits == []


async def test_bedrock_endpoint_at_a_refused_address_is_never_reached(
    recorder: HostileServer, stored_session: aiohttp.ClientSession
) -> None:
    error = await failure(bedrock(stored_session, endpoint_url=recorder.url("0.0.0.0")))

    assert error.code == "egress_refused"
    assert recorder.hits == []


async def test_bedrock_response_over_the_cap_is_too_large(hostile: HostileServer) -> None:
    hostile.response = CannedResponse(200, {"Content-Type": "application/json"}, b"{}", declared_length=10**12)
    async with egress_session(EgressPolicy(max_response_bytes=1024)) as session:
        error = await failure(bedrock(session, endpoint_url=hostile.url()))

    assert error.code == "provider_response_too_large"

"""What a provider's endpoint answers is bounded like a request body: by its entries, so parsing it cannot hold the
event loop, and for drafts by a small size."""

from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.ops.scrape import free_port
from worker.errors import ErrorClass, ProviderError
from worker.providers.egress import DEFAULT_MAX_RESPONSE_BYTES, DRAFT_MAX_RESPONSE_BYTES, EgressPolicy
from worker.providers.http import MAX_RESPONSE_ENTRIES, send_json

# An answer of tiny entries: 8 MiB of them took 1.6 s to parse on the loop.
FLOOD = orjson.dumps({"error": {"message": "x", "details": [[]] * (MAX_RESPONSE_ENTRIES + 10)}})


class Answers:
    """An endpoint that answers every request with `status` and `body`."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.url = ""


@pytest.fixture
async def endpoint() -> AsyncIterator[Answers]:
    answers = Answers()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=answers.status, body=answers.body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    answers.url = f"http://127.0.0.1:{port}/v1/chat/completions"
    yield answers
    await runner.cleanup()


async def test_an_answer_with_more_entries_than_the_bound_is_refused_unparsed(
    endpoint: Answers, session: aiohttp.ClientSession
) -> None:
    endpoint.body = FLOOD

    with pytest.raises(ProviderError) as caught:
        await send_json(session, "POST", endpoint.url, who="the fake", body={"model": "m"})

    assert caught.value.code == "malformed_response"
    assert f"more than {MAX_RESPONSE_ENTRIES:,}" in caught.value.message


async def test_an_error_answer_with_too_many_entries_is_still_classified_by_its_status(
    endpoint: Answers, session: aiohttp.ClientSession
) -> None:
    endpoint.status, endpoint.body = 429, FLOOD

    with pytest.raises(ProviderError) as caught:
        await send_json(session, "POST", endpoint.url, who="the fake", body={"model": "m"})

    assert caught.value.error_class is ErrorClass.RATE_LIMITED
    assert "not read" in caught.value.message


async def test_an_answer_within_the_bound_is_parsed(endpoint: Answers, session: aiohttp.ClientSession) -> None:
    endpoint.body = orjson.dumps({"data": [0] * (MAX_RESPONSE_ENTRIES - 10)})  # 1 member + its elements

    answer = await send_json(session, "GET", endpoint.url, who="the fake")

    assert len(answer["data"]) == MAX_RESPONSE_ENTRIES - 10


def test_drafts_read_at_most_a_small_answer_whatever_the_stored_tenants_limit() -> None:
    assert EgressPolicy.for_drafts([]).max_response_bytes == DRAFT_MAX_RESPONSE_BYTES
    assert EgressPolicy.for_drafts([], max_response_bytes=DEFAULT_MAX_RESPONSE_BYTES).max_response_bytes == (
        DRAFT_MAX_RESPONSE_BYTES
    )
    assert EgressPolicy.for_drafts([], max_response_bytes=64 * 1024).max_response_bytes == 64 * 1024
    assert DRAFT_MAX_RESPONSE_BYTES < DEFAULT_MAX_RESPONSE_BYTES

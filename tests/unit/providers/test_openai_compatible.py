"""The OpenAI-compatible provider's credentials: a key is resolved at every call, so a rotated one applies at once."""

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from contracts import OpenAICompatibleSettings
from tests.fakes.openai_server import FakeOpenAI
from tests.unit.providers.calls import call_for
from worker.errors import ErrorClass, ProviderError
from worker.providers.openai_compatible import OpenAICompatibleProvider


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key="sk-first-key-0001")
    await fake.start()
    yield fake
    await fake.close()


async def test_a_rotated_key_file_is_sent_from_the_next_call_on(
    fake_openai: FakeOpenAI, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("sk-first-key-0001\n")
    config = {"kind": "openai_compatible", "base_url": fake_openai.base_url, "model": fake_openai.model}
    provider = OpenAICompatibleProvider(
        OpenAICompatibleSettings.model_validate(config | {"api_key": f"file:{key_file}"}), session
    )
    call = call_for("summary", config)

    first = await provider.complete(call)
    fake_openai.api_key = "sk-second-key-0002"  # the old key is revoked at the provider...
    with pytest.raises(ProviderError) as refused:
        await provider.complete(call)
    key_file.write_text("sk-second-key-0002\n")  # ...and the new one is mounted
    after = await provider.complete(call)

    assert first.text
    assert after.text
    assert refused.value.error_class is ErrorClass.AUTH

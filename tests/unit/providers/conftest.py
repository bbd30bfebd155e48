"""Fixtures for provider tests: the fakes, an HTTP session, and model calls built the way the handler builds them."""

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fakes.fixtures import _isolated_cloud_sdks, fake_aws, fake_azure, fake_ollama, fake_vertex  # noqa: F401
from worker.providers.egress import EgressPolicy, egress_session


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with egress_session(EgressPolicy()) as s:
        yield s

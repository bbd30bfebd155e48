"""Provider lifetime: the pool closes a tenant's provider when its settings change (after the calls running on
it) and on shutdown; Bedrock opens one client for many calls."""

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from structlog.testing import capture_logs

from contracts import TenantConfig
from contracts.tenant import ProviderSettings
from tests.fakes.fixtures import AwsFakes
from tests.unit.providers.calls import call_for
from worker.log import configure_logging
from worker.providers.base import Finish, ModelCall, ModelResult, Provider
from worker.providers.bounded import within
from worker.providers.pool import ProviderPool, build_provider

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"


@pytest.fixture
def info_logs(restore_logging: None) -> None:
    configure_logging("info", cache=False)  # the events below are logged at info


class Recorded:
    """A provider that answers when `gate` opens and writes what happens to it into `events`."""

    kind = "openai_compatible"
    model = "recorded"

    def __init__(self, name: str, events: list[str], gate: asyncio.Event) -> None:
        self.endpoint = f"http://{name}.invalid"
        self._name, self._events, self._gate = name, events, gate
        self.started = asyncio.Event()

    async def complete(self, call: ModelCall) -> ModelResult:
        self.started.set()
        await self._gate.wait()
        self._events.append(f"{self._name} answered")
        return ModelResult("ok", Finish.STOP)

    async def aclose(self) -> None:
        self._events.append(f"{self._name} closed")


def tenant(base_url: str) -> TenantConfig:
    provider = {"kind": "openai_compatible", "base_url": base_url, "model": "m"}
    return TenantConfig.model_validate({"tenant_id": "acme", "provider": provider})


def recording_factory(
    events: list[str], gate: asyncio.Event, built: list[Recorded]
) -> Callable[[ProviderSettings, aiohttp.ClientSession], Provider]:
    def factory(settings: ProviderSettings, session: aiohttp.ClientSession) -> Provider:
        assert settings.kind == "openai_compatible"
        built.append(Recorded(settings.base_url.split("//")[1], events, gate))
        return built[-1]

    return factory


async def test_changed_settings_close_the_old_provider_after_its_running_call() -> None:
    events: list[str] = []
    gate = asyncio.Event()
    built: list[Recorded] = []
    call = ModelCall(system="s", turns=(), max_output_tokens=10, timeout_s=10)
    async with aiohttp.ClientSession() as session:
        pool = ProviderPool(session, {"openai_compatible": recording_factory(events, gate, built)})
        running = asyncio.create_task(pool.get(tenant("http://old")).complete(call))
        await built[0].started.wait()

        new = pool.get(tenant("http://new"))  # the tenant file changed while a call was running
        gate.set()
        answer = await running
        await new.complete(call)
        await pool.aclose()

    assert answer.text == "ok"  # the running call was not cut
    assert events.index("old answered") < events.index("old closed")
    assert events[-1] == "new closed"  # closed on shutdown
    assert events.count("old closed") == events.count("new closed") == 1


async def test_same_settings_keep_the_provider_and_close_nothing(info_logs: None) -> None:
    events: list[str] = []
    gate = asyncio.Event()
    gate.set()
    built: list[Recorded] = []
    async with aiohttp.ClientSession() as session:
        pool = ProviderPool(session, {"openai_compatible": recording_factory(events, gate, built)})
        first = pool.get(tenant("http://same"))
        assert pool.get(tenant("http://same")) is first
        with capture_logs() as logs:
            await pool.aclose()

    assert len(built) == 1
    assert events == ["same closed"]
    assert [e["event"] for e in logs] == ["provider_closed"]


async def test_bedrock_opens_one_client_for_many_calls_and_closes_it(
    fake_aws: AwsFakes, session: aiohttp.ClientSession, info_logs: None
) -> None:
    config = {
        "kind": "bedrock",
        "region": "eu-central-1",
        "model_id": CLAUDE,
        "access_key_id": "env:TEST_AWS_KEY_ID",
        "secret_access_key": "env:TEST_AWS_SECRET",
        "endpoint_url": fake_aws.bedrock.endpoint_url,
    }
    tenant_config = TenantConfig.model_validate({"tenant_id": "acme", "provider": config})
    bedrock = build_provider(tenant_config.provider, session)
    call = call_for("summary", config)

    with capture_logs() as logs:
        await asyncio.gather(*(within(30, bedrock.endpoint, bedrock.complete(call)) for _ in range(3)))
        await bedrock.complete(call)
        await bedrock.aclose()
        await bedrock.complete(call)  # a call arriving after closing gets a client of its own, closed after it

    assert len(fake_aws.bedrock.access_keys_seen) == 5
    assert [e["event"] for e in logs].count("bedrock_client_opened") == 2

"""Builds the provider for a tenant's settings and reuses it while the settings stay the same."""

import asyncio
from collections.abc import Callable

import aiohttp
import structlog

from contracts import TenantConfig
from contracts.tenant import ProviderSettings
from worker.errors import ErrorClass, ProviderError
from worker.providers import azure_openai, bedrock, ollama, openai_compatible, vertex
from worker.providers.azure_openai import AzureOpenAIProvider
from worker.providers.base import Provider
from worker.providers.bedrock import BedrockProvider
from worker.providers.bounded import GuardedProvider
from worker.providers.breaker import BreakerBoard
from worker.providers.ollama import OllamaProvider
from worker.providers.openai_compatible import OpenAICompatibleProvider
from worker.providers.vertex import VertexProvider
from worker.tracing import NO_TRACING, Tracing

log = structlog.get_logger("worker.providers.pool")

ProviderFactory = Callable[[ProviderSettings, aiohttp.ClientSession], Provider]


def _openai_compatible(settings: ProviderSettings, session: aiohttp.ClientSession) -> Provider:
    assert settings.kind == "openai_compatible"
    return OpenAICompatibleProvider(settings, session)


def _azure_openai(settings: ProviderSettings, session: aiohttp.ClientSession) -> Provider:
    assert settings.kind == "azure_openai"
    return AzureOpenAIProvider(settings, session)


def _bedrock(settings: ProviderSettings, session: aiohttp.ClientSession) -> Provider:
    assert settings.kind == "bedrock"
    return BedrockProvider(settings, session)


def _vertex(settings: ProviderSettings, session: aiohttp.ClientSession) -> Provider:
    assert settings.kind == "vertex"
    return VertexProvider(settings, session)


def _ollama(settings: ProviderSettings, session: aiohttp.ClientSession) -> Provider:
    assert settings.kind == "ollama"
    return OllamaProvider(settings, session)


FACTORIES: dict[str, ProviderFactory] = {
    "openai_compatible": _openai_compatible,
    "azure_openai": _azure_openai,
    "bedrock": _bedrock,
    "vertex": _vertex,
    "ollama": _ollama,
}


def endpoints(settings: ProviderSettings) -> list[str]:
    """Every URL the worker would contact for these settings, as the provider itself derives them."""
    match settings.kind:
        case "openai_compatible":
            return openai_compatible.endpoints(settings)
        case "azure_openai":
            return azure_openai.endpoints(settings)
        case "bedrock":
            return bedrock.endpoints(settings)
        case "vertex":
            return vertex.endpoints(settings)
        case "ollama":
            return ollama.endpoints(settings)
    raise AssertionError(settings)


def build_provider(
    settings: ProviderSettings,
    session: aiohttp.ClientSession,
    factories: dict[str, ProviderFactory] | None = None,
) -> Provider:
    """The one way a provider is made: the factory for its kind, over the given (egress-guarded) session."""
    factory = (factories if factories is not None else FACTORIES).get(settings.kind)
    if factory is None:
        raise ProviderError(
            ErrorClass.BAD_REQUEST,
            f"provider kind {settings.kind!r} is not available in this worker",
            code="provider_unsupported",
        )
    return factory(settings, session)


class ProviderPool:
    """One provider object per tenant settings; all share one HTTP session (connection reuse)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        factories: dict[str, ProviderFactory] | None = None,
        breakers: BreakerBoard | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._session = session
        self._tracing = tracing
        self._factories = factories
        self.breakers = breakers or BreakerBoard()
        self._built: dict[str, tuple[ProviderSettings, GuardedProvider]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, tenant: TenantConfig) -> GuardedProvider:
        """The tenant's provider, bounded by its timeout and guarded by its endpoint's circuit breaker."""
        cached = self._built.get(tenant.tenant_id)
        if cached is not None and cached[0] == tenant.provider:
            return cached[1]
        inner = self.build(tenant.provider)
        provider = GuardedProvider(inner, self.breakers.get(tenant.tenant_id, inner.endpoint), self._tracing)
        self._built[tenant.tenant_id] = (tenant.provider, provider)
        if cached is not None:
            self._retire(tenant.tenant_id, cached[1])  # the settings changed: calls already running finish first
        return provider

    def build(self, settings: ProviderSettings) -> Provider:
        """A fresh, uncached provider for settings that are not (yet) a tenant's, e.g. for Test Connection;
        the caller closes it."""
        return build_provider(settings, self._session, self._factories)

    def _retire(self, tenant_id: str, provider: GuardedProvider) -> None:
        task = asyncio.get_running_loop().create_task(self._close(tenant_id, provider))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, tenant_id: str, provider: GuardedProvider) -> None:
        try:
            await provider.aclose()
        except Exception:  # a provider that fails to close must not stop the others from closing
            log.exception("provider_close_failed", tenant_id=tenant_id, provider=provider.kind)
            return
        log.info("provider_closed", tenant_id=tenant_id, provider=provider.kind, endpoint=provider.endpoint)

    async def aclose(self) -> None:
        """Close every provider (after the calls running on it) and wait for those retired earlier."""
        built, self._built = self._built, {}
        for tenant_id, (_, provider) in built.items():
            self._retire(tenant_id, provider)
        await asyncio.gather(*self._closing)

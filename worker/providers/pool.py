"""Builds the provider for a tenant's settings and reuses it while the settings stay the same."""

from collections.abc import Callable

import aiohttp

from contracts import TenantConfig
from contracts.tenant import ProviderSettings
from worker.errors import ErrorClass, ProviderError
from worker.providers.azure_openai import AzureOpenAIProvider
from worker.providers.base import Provider
from worker.providers.bedrock import BedrockProvider
from worker.providers.bounded import GuardedProvider
from worker.providers.breaker import BreakerBoard
from worker.providers.ollama import OllamaProvider
from worker.providers.openai_compatible import OpenAICompatibleProvider
from worker.providers.vertex import VertexProvider
from worker.tracing import NO_TRACING, Tracing

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
        self._factories = factories if factories is not None else FACTORIES
        self.breakers = breakers or BreakerBoard()
        self._built: dict[str, tuple[ProviderSettings, GuardedProvider]] = {}

    def get(self, tenant: TenantConfig) -> GuardedProvider:
        """The tenant's provider, bounded by its timeout and guarded by its endpoint's circuit breaker."""
        cached = self._built.get(tenant.tenant_id)
        if cached is not None and cached[0] == tenant.provider:
            return cached[1]
        factory = self._factories.get(tenant.provider.kind)
        if factory is None:
            raise ProviderError(
                ErrorClass.BAD_REQUEST,
                f"provider kind {tenant.provider.kind!r} is not available in this worker",
                code="provider_unsupported",
            )
        inner = factory(tenant.provider, self._session)
        provider = GuardedProvider(inner, self.breakers.get(tenant.tenant_id, inner.endpoint), self._tracing)
        self._built[tenant.tenant_id] = (tenant.provider, provider)
        return provider

    def build(self, settings: ProviderSettings) -> Provider:
        """A fresh, uncached provider for settings that are not (yet) a tenant's, e.g. for Test Connection."""
        factory = self._factories.get(settings.kind)
        if factory is None:
            raise ProviderError(
                ErrorClass.BAD_REQUEST,
                f"provider kind {settings.kind!r} is not available in this worker",
                code="provider_unsupported",
            )
        return factory(settings, self._session)

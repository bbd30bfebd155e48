"""Wraps a provider with the tenant's timeout and its circuit breaker, so every call is bounded and counted."""

import asyncio

from worker.breaker import CircuitBreaker
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import ModelCall, ModelResult, Provider
from worker.tracing import NO_TRACING, Tracing

# Only failures that say "the endpoint is not serving" trip the breaker; a rejected request proves it is up.
TRIPS_BREAKER = frozenset({ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED})


class GuardedProvider:
    def __init__(self, provider: Provider, breaker: CircuitBreaker, tracing: Tracing = NO_TRACING) -> None:
        self._provider = provider
        self.breaker = breaker
        self._tracing = tracing

    @property
    def kind(self) -> str:
        return self._provider.kind

    @property
    def endpoint(self) -> str:
        return self._provider.endpoint

    @property
    def model(self) -> str:
        return self._provider.model

    @property
    def inner(self) -> Provider:
        return self._provider

    async def complete(self, call: ModelCall) -> ModelResult:
        if not self.breaker.allow():
            raise ProviderError(
                ErrorClass.TRANSIENT,
                f"circuit open for {self.endpoint} after repeated failures; next probe in "
                f"{self.breaker.retry_after_s():.0f}s",
                code="circuit_open",
                retry_after_s=self.breaker.retry_after_s(),
            )
        with self._tracing.model_call(self, call) as telemetry:  # the GenAI span and metrics of this call
            return telemetry.answered(await self._bounded(call))

    async def _bounded(self, call: ModelCall) -> ModelResult:
        try:
            async with asyncio.timeout(call.timeout_s):
                result = await self._provider.complete(call)
        except TimeoutError:
            self.breaker.record_failure()
            raise ProviderError(
                ErrorClass.TRANSIENT, f"{self.endpoint} did not answer within {call.timeout_s:g}s", code="timeout"
            ) from None
        except ProviderError as exc:
            if exc.error_class in TRIPS_BREAKER:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            raise
        except BaseException:
            self.breaker.record_nothing()  # cancelled, or a bug: says nothing about the endpoint
            raise
        self.breaker.record_success()
        return result

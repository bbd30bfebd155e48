"""Wraps a provider with the tenant's timeout and its circuit breaker, so every call is bounded and counted."""

import asyncio
from collections.abc import Awaitable, Hashable
from typing import TypeVar

from worker.errors import CircuitOpen, ErrorClass, ProviderError
from worker.providers.base import ModelCall, ModelResult, Provider
from worker.providers.breaker import CircuitBreaker, Permit
from worker.tracing import NO_TRACING, Tracing

# Only failures that say "the endpoint is not serving" trip the breaker; a rejected request proves it is up,
# and so does a body that does not parse: it came back at once, like an answer that does not validate.
TRIPS_BREAKER = frozenset({ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED})
ANSWERED = frozenset({"malformed_response"})

T = TypeVar("T")


async def within(timeout_s: float, endpoint: str, work: Awaitable[T]) -> T:
    """The one place a provider call is bounded in time, and the one message saying it was not answered."""
    try:
        async with asyncio.timeout(timeout_s):
            return await work
    except TimeoutError:
        raise ProviderError(
            ErrorClass.TRANSIENT, f"{endpoint} did not answer within {timeout_s:g}s", code="timeout"
        ) from None


class GuardedProvider:
    def __init__(self, provider: Provider, breaker: CircuitBreaker, tracing: Tracing = NO_TRACING) -> None:
        self._provider = provider
        # A provider's endpoint is fixed, but reading it masks its URL again: read once, not on every call.
        self._endpoint = provider.endpoint
        self.breaker = breaker
        self._tracing = tracing
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def kind(self) -> str:
        return self._provider.kind

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def model(self) -> str:
        return self._provider.model

    @property
    def inner(self) -> Provider:
        return self._provider

    async def aclose(self) -> None:
        """Close the provider once the calls already running on it have finished (none is cut short)."""
        await self._idle.wait()
        await self._provider.aclose()

    async def complete(
        self, call: ModelCall, subject: Hashable | None = None, *, failed_before: bool = False
    ) -> ModelResult:
        """Call the provider; `subject` (the request id) makes the breaker count each request once, and
        `failed_before` (it is a retry) keeps its failing again from counting against the endpoint."""
        permit = self.breaker.admit(subject if subject is not None else object(), failed_before=failed_before)
        if permit is None:
            wait_s = self.breaker.retry_after_s()
            raise CircuitOpen(
                f"circuit open for {self.endpoint}: most recent requests failed; next probe in {wait_s:.0f}s",
                retry_after_s=wait_s,
            )
        self._in_flight += 1
        self._idle.clear()
        try:
            with self._tracing.model_call(self, call) as telemetry:  # the GenAI span and metrics of this call
                return telemetry.answered(await self._bounded(call, permit))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _bounded(self, call: ModelCall, permit: Permit) -> ModelResult:
        try:
            result = await within(call.timeout_s, self.endpoint, self._provider.complete(call))
        except ProviderError as exc:
            if exc.error_class is ErrorClass.CONFIG:  # never sent: says nothing about the endpoint
                self.breaker.released(permit)
            elif exc.error_class in TRIPS_BREAKER and exc.code not in ANSWERED:
                self.breaker.failed(permit)
            else:
                self.breaker.succeeded(permit)
            raise
        except BaseException:
            self.breaker.released(permit)  # cancelled, or a bug: says nothing about the endpoint
            raise
        self.breaker.succeeded(permit)
        return result

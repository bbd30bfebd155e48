"""Circuit breakers per tenant and provider endpoint: stop calling an endpoint that keeps failing."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

log = structlog.get_logger("worker.breaker")


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls fail at once, and the tenant's policy applies without calling the provider
    HALF_OPEN = "half_open"  # the cooldown is over: one probe call decides


@dataclass
class CircuitBreaker:
    """Opens after `failure_threshold` consecutive availability failures; after `cooldown_s` lets one probe through."""

    tenant_id: str
    endpoint: str
    failure_threshold: int = 5
    cooldown_s: float = 30.0
    on_change: Callable[["CircuitBreaker"], None] | None = None
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    _opened_at: float = 0.0
    _probing: bool = field(default=False, repr=False)

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one probe is in flight at a time."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self.clock() - self._opened_at < self.cooldown_s:
                return False
            self._move(BreakerState.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_after_s(self) -> float:
        return max(0.0, self.cooldown_s - (self.clock() - self._opened_at))

    def record_success(self) -> None:
        self._probing = False
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._probing = False
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self._opened_at = self.clock()
            if self.state is not BreakerState.OPEN:
                self._move(BreakerState.OPEN)

    def record_nothing(self) -> None:
        """The call ended without telling us anything about the endpoint (e.g. it was cancelled)."""
        self._probing = False

    def _move(self, state: BreakerState) -> None:
        previous, self.state = self.state, state
        log.warning(
            f"circuit_{state.value}",
            tenant_id=self.tenant_id,
            endpoint=self.endpoint,
            previous=previous.value,
            consecutive_failures=self.failures,
            cooldown_s=self.cooldown_s,
        )
        if self.on_change is not None:
            self.on_change(self)


@dataclass
class BreakerBoard:
    """All breakers of one worker, keyed by (tenant, endpoint)."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0
    on_change: Callable[[CircuitBreaker], None] | None = None
    _breakers: dict[tuple[str, str], CircuitBreaker] = field(default_factory=dict)

    def get(self, tenant_id: str, endpoint: str) -> CircuitBreaker:
        key = (tenant_id, endpoint)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(
                tenant_id, endpoint, self.failure_threshold, self.cooldown_s, self.on_change
            )
        return breaker

    def states(self) -> dict[tuple[str, str], BreakerState]:
        return {key: breaker.state for key, breaker in self._breakers.items()}

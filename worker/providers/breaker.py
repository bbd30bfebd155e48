"""Circuit breakers per tenant and provider endpoint: stop calling an endpoint that is failing most of its calls."""

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

log = structlog.get_logger("worker.providers.breaker")


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through; their outcomes are judged over the window
    OPEN = "open"  # calls are refused until the cooldown has passed; the tenant's policy applies without a call
    HALF_OPEN = "half_open"  # the cooldown is over: a few probe calls decide


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how it recovers; one policy for every breaker of a worker."""

    failure_rate: float = 0.5  # open when at least this share of the window's requests last failed …
    min_calls: int = 20  # … and the window holds at least this many requests (fewer are noise)
    window_s: float = 30.0  # how far back outcomes count
    cooldown_s: float = 20.0  # how long an open circuit refuses calls before probing
    probes: int = 3  # calls let through while half-open; they close the circuit unless too many fail

    def __post_init__(self) -> None:
        if not (0 < self.failure_rate <= 1 and self.min_calls >= 1 and self.probes >= 1):
            raise ValueError("breaker needs 0 < failure_rate <= 1, min_calls >= 1 and probes >= 1")
        if self.window_s <= 0 or self.cooldown_s < 0:
            raise ValueError("breaker needs window_s > 0 and cooldown_s >= 0")

    @property
    def probe_failures_to_reopen(self) -> int:
        """Failed probes that make the probes' failure rate reach `failure_rate` whatever the others do."""
        return max(1, math.ceil(self.probes * self.failure_rate))


@dataclass(frozen=True, slots=True)
class Permit:
    """One call let through; hand it back with its outcome. `subject` identifies the request it serves."""

    subject: Hashable
    probe: bool
    failed_before: bool = False  # the request already failed: its failing again says little of the endpoint


@dataclass
class CircuitBreaker:
    """Judges an endpoint by the share of its recent requests whose last call failed.

    Each request (`subject`) counts once in the window, with the outcome of its latest call, so a few
    requests that fail every time they are retried weigh as much as they are, not once per retry; and a
    request that had already failed before this call counts only if it now succeeds.
    Only availability failures count (the caller decides which); a request the provider rejected proves
    the endpoint is up. After `cooldown_s` open, `probes` calls go through: the circuit closes when
    enough of them succeed and opens for another cooldown when too many fail.
    """

    tenant_id: str
    endpoint: str
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    on_change: Callable[["CircuitBreaker"], None] | None = None
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    _window: dict[Hashable, tuple[float, bool]] = field(default_factory=dict, repr=False)  # subject → (when, ok)
    _window_failures: int = field(default=0, repr=False)
    _opened_at: float = field(default=0.0, repr=False)
    _probes_out: int = field(default=0, repr=False)  # probe permits handed out in this half-open round
    _probe_failures: int = field(default=0, repr=False)
    _probe_successes: int = field(default=0, repr=False)

    def admit(self, subject: Hashable, *, failed_before: bool = False) -> Permit | None:
        """A permit to call now, or None: the circuit is open, or half-open with every probe handed out."""
        state = self.current_state()
        if state is BreakerState.CLOSED:
            return Permit(subject, probe=False, failed_before=failed_before)
        if state is BreakerState.OPEN or self._probes_out >= self.policy.probes:
            return None
        self._probes_out += 1
        return Permit(subject, probe=True, failed_before=failed_before)

    def current_state(self) -> BreakerState:
        """The state a call would meet now: an open circuit whose cooldown has passed is half-open."""
        if self.state is BreakerState.OPEN and self.clock() - self._opened_at >= self.policy.cooldown_s:
            self._move(BreakerState.HALF_OPEN)
        return self.state

    def retry_after_s(self) -> float:
        """How long until a call may be let through again (0 while half-open: probes finish soon)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.policy.cooldown_s - (self.clock() - self._opened_at))

    def succeeded(self, permit: Permit) -> None:
        if permit.probe:
            self._probe_ended(ok=True)
        elif self.state is BreakerState.CLOSED:
            self._remember(permit.subject, ok=True)

    def failed(self, permit: Permit) -> None:
        if permit.failed_before:
            # Retries are the requests selected for failing (after a restart they are most of the traffic):
            # their failures would judge those requests, not the endpoint. Their successes still count.
            self.released(permit)
        elif permit.probe:
            self._probe_ended(ok=False)
        elif self.state is BreakerState.CLOSED:
            # Calls let through before the circuit opened and ending after it say nothing new.
            self._remember(permit.subject, ok=False)

    def released(self, permit: Permit) -> None:
        """The call ended without telling anything about the endpoint (cancelled, or a bug)."""
        if permit.probe and self.state is BreakerState.HALF_OPEN:
            self._probes_out -= 1

    def _remember(self, subject: Hashable, *, ok: bool) -> None:
        now = self.clock()
        previous = self._window.pop(subject, None)
        if previous is not None and not previous[1]:
            self._window_failures -= 1
        self._window[subject] = (now, ok)  # re-inserted: the dict stays ordered by time of the latest call
        self._window_failures += not ok
        horizon = now - self.policy.window_s
        while self._window:
            oldest = next(iter(self._window))
            when, oldest_ok = self._window[oldest]
            if when >= horizon:
                break
            del self._window[oldest]
            self._window_failures -= not oldest_ok
        if self._tripped():  # judged after every call: a success can complete the minimum number of requests
            self._open()

    def _tripped(self) -> bool:
        counted = len(self._window)
        return counted >= self.policy.min_calls and self._window_failures >= self.policy.failure_rate * counted

    def _probe_ended(self, *, ok: bool) -> None:
        if self.state is not BreakerState.HALF_OPEN:
            return  # a probe of an earlier round, already decided
        if ok:
            self._probe_successes += 1
        else:
            self._probe_failures += 1
        if self._probe_failures >= self.policy.probe_failures_to_reopen:
            self._open()
        elif self._probe_successes > self.policy.probes - self.policy.probe_failures_to_reopen:
            self._window.clear()  # the outage is over: its failures must not reopen the circuit
            self._window_failures = 0
            self._move(BreakerState.CLOSED)

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        previous, self.state = self.state, state
        self._probes_out = self._probe_failures = self._probe_successes = 0
        log.warning(
            f"circuit_{state.value}",
            tenant_id=self.tenant_id,
            endpoint=self.endpoint,
            previous=previous.value,
            window_requests=len(self._window),
            window_failures=self._window_failures,
            cooldown_s=self.policy.cooldown_s,
        )
        if self.on_change is not None:
            self.on_change(self)


@dataclass
class BreakerBoard:
    """All breakers of one worker, keyed by (tenant, endpoint)."""

    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    on_change: Callable[[CircuitBreaker], None] | None = None
    clock: Callable[[], float] = time.monotonic
    _breakers: dict[tuple[str, str], CircuitBreaker] = field(default_factory=dict)

    @property
    def cooldown_s(self) -> float:
        return self.policy.cooldown_s

    def get(self, tenant_id: str, endpoint: str) -> CircuitBreaker:
        key = (tenant_id, endpoint)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(tenant_id, endpoint, self.policy, self.on_change, self.clock)
        return breaker

    def states(self) -> dict[tuple[str, str], BreakerState]:
        """Each breaker's state as a call would meet it now (cooldowns that passed are half-open)."""
        return {key: breaker.current_state() for key, breaker in self._breakers.items()}

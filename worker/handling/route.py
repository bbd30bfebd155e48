"""Request → who handles it: task dispatch, tenant lookup, the deadline, per-tenant slots. Knows no AMQP."""

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from contracts import ErrorInfo, InferenceRequest, Status, Task, TenantConfig
from worker.handling import replies
from worker.handling.handler import Handler
from worker.handling.outcome import DeadLetter, DeadLetterReason, Defer, DeliveryContext, Outcome, Reply, Reroute
from worker.tenants import ConfigProblem


class TenantLookup(Protocol):
    """What handling needs from the tenant registry."""

    def get(self, tenant_id: str) -> TenantConfig | None: ...

    def problems(self, tenant_id: str) -> Sequence[ConfigProblem] | None: ...

    def case_variant(self, tenant_id: str) -> str | None: ...

    @property
    def healthy(self) -> bool: ...


# The queue's `test_connection` task, given to the router by the composition root (`worker.app`).
AnswerTestConnection = Callable[[InferenceRequest, DeliveryContext], Awaitable[Outcome]]

# Test Connection probes of drafts (a configuration in the message) naming one tenant share this cap.
PROBES_PER_UNCONFIGURED_TENANT = 2
# Their slots' key: a tenant id never holds a ':', so no tenant's own slots are counted under it.
DRAFTS_OF = "drafts:"
# Probes in flight across all tenants: tenant ids in messages are the publisher's to choose, so without a
# worker-wide cap a flood of distinct ids could still fill every prefetched delivery with hanging probes.
PROBES_IN_FLIGHT = 8


class TenantSlots:
    """Per-tenant count of provider calls and probes in flight, capped by `limits.max_concurrency`."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._probes = 0

    def try_acquire(self, tenant: TenantConfig) -> bool:
        return self._take(tenant.tenant_id, tenant.limits.max_concurrency)

    def release(self, tenant: TenantConfig) -> None:
        self._give(tenant.tenant_id)

    def try_acquire_probe(self, tenant_id: str, limit: int) -> bool:
        """A Test Connection probe takes one of the tenant's slots, and one of the worker's few probe slots."""
        if self._probes >= PROBES_IN_FLIGHT or not self._take(tenant_id, limit):
            return False
        self._probes += 1
        return True

    def release_probe(self, tenant_id: str) -> None:
        self._probes -= 1
        self._give(tenant_id)

    def _take(self, key: str, limit: int) -> bool:
        used = self._in_flight.get(key, 0)
        if used >= limit:
            return False
        self._in_flight[key] = used + 1
        return True

    def _give(self, key: str) -> None:
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
        else:
            del self._in_flight[key]  # publisher-chosen tenant ids must not accumulate


class Router:
    """Decides who answers a request: Test Connection, the model-call handler, Atlas Cloud, or nobody yet."""

    def __init__(
        self,
        tenants: TenantLookup,
        handler: Handler,
        test_connection: AnswerTestConnection,
        slots: TenantSlots | None = None,
    ) -> None:
        self._tenants = tenants
        self._handler = handler
        self._test_connection = test_connection
        self._slots = slots or TenantSlots()

    async def handle(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        if request.task is Task.TEST_CONNECTION:
            return await self._probe(request, ctx)
        tenant = self._tenants.get(request.tenant_id)
        if tenant is None:
            return self._without_config(request, ctx)
        if request.deadline is not None and request.deadline <= datetime.now(UTC):
            error = ErrorInfo(code="deadline_exceeded", message="the request's deadline passed before it was handled")
            reply = replies.answer(request, ctx, Status.EXPIRED, error=error, tenant=tenant)
            dead = None
            if ctx.attempts:
                dead = DeadLetter(DeadLetterReason.EXPIRED, error, tenant.provider.kind, ctx.attempts)
            return Reply(reply, dead)
        if not self._slots.try_acquire(tenant):
            return Defer()
        try:
            return await self._handler.handle(tenant, request, ctx)
        finally:
            self._slots.release(tenant)

    async def _probe(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        """Test Connection of the stored config, counted against the tenant's concurrency like any request: a flood
        of probes at a hanging endpoint is deferred instead of holding every delivery the worker has prefetched.
        A draft's probe tests the publisher's endpoint, not the tenant's: it counts against a small share of its
        own, never against the slots the tenant's requests need."""
        tenant = self._tenants.get(request.tenant_id)
        if request.provider is not None or tenant is None:
            key, limit = f"{DRAFTS_OF}{request.tenant_id}", PROBES_PER_UNCONFIGURED_TENANT
        else:
            key, limit = request.tenant_id, tenant.limits.max_concurrency
        if not self._slots.try_acquire_probe(key, limit):
            return Defer()
        try:
            return await self._test_connection(request, ctx)
        finally:
            self._slots.release_probe(key)

    def _without_config(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        """No loaded config: Atlas Cloud serves the tenant only when the healthy source truly holds none for it."""
        if (problems := self._tenants.problems(request.tenant_id)) is not None:
            # Field and reason only: the file's path is the operator's business, and no problem quotes a secret.
            why = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems[:3])
            error = ErrorInfo(
                code="tenant_config_invalid",
                message=f"the tenant's configuration file does not validate ({why}); fix it and replay",
            )
            reply = replies.answer(request, ctx, Status.FAILED, error=error)
            return Reply(reply, DeadLetter(DeadLetterReason.TENANT_CONFIG_INVALID, error, attempts=ctx.attempts))
        if (configured := self._tenants.case_variant(request.tenant_id)) is not None:
            error = ErrorInfo(
                code="tenant_id_case_mismatch",
                message=f"tenant_id {request.tenant_id!r} differs only in letter case from the configured "
                f"tenant {configured!r}; tenant ids are case-sensitive",
            )
            reply = replies.answer(request, ctx, Status.REJECTED, error=error)
            return Reply(reply, DeadLetter(DeadLetterReason.MALFORMED, error, attempts=ctx.attempts))
        if not self._tenants.healthy:
            # The source cannot be read: whether this tenant has a config is unknown, so it waits on the ladder
            # (no attempt spent) rather than being rerouted. Consumption pauses too; this covers the race.
            return Defer()
        return Reroute(reason="no_byoc_config")

"""The composition root: opens the broker connection, HTTP session and registry, runs the consumer, drains."""

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import structlog
from opentelemetry.trace import TracerProvider

from contracts import FallbackPolicy, InferenceRequest
from worker.broker.amqp_url import login_user
from worker.broker.connection import WorkerChannels, connect_worker, open_channels
from worker.broker.consumer import Consumer, Settled
from worker.broker.header_trust import HeaderTrust, load_keys
from worker.broker.settle import Settler
from worker.broker.topology import topology_spec
from worker.connection_check.task import answer_test_connection
from worker.exit_codes import ExitCode, StartupError
from worker.handling.handler import Handler
from worker.handling.outcome import DeliveryContext, Outcome
from worker.handling.route import Router
from worker.ops.health import serve_health
from worker.ops.loop_lag import watch_loop_lag
from worker.ops.metrics import Metrics
from worker.providers.breaker import BreakerBoard, BreakerState, CircuitBreaker
from worker.providers.egress import egress_session
from worker.providers.pool import ProviderFactory, ProviderPool
from worker.runtime import freeze_heap
from worker.settings import WorkerSettings
from worker.tenants import TenantRegistry, TenantSourceFault, scan_directory
from worker.tracing import Tracing, content_capture_requested, tracing_from_env

if TYPE_CHECKING:  # the broker's types stay in the broker folder at run time
    from aio_pika.abc import AbstractRobustConnection

log = structlog.get_logger("worker.app")

RETURNED_IDS_LOGGED = 20  # the drain log names this many returned request ids, then counts the rest


class WorkerApp:
    """One worker process. `run()` returns after `stop()` once in-flight work is drained."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        on_settled: Callable[[Settled], None] | None = None,
        provider_factories: dict[str, ProviderFactory] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(self._has_config_file)
        self.registry = TenantRegistry(settings.tenants_dir, on_fault=self._tenant_source_fault)
        self.tenants_watched = False  # the reload loop is running: without it no change would ever be seen
        self.ready = asyncio.Event()
        self.draining = False
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._on_settled = on_settled
        self._provider_factories = provider_factories  # None: the real providers; benchmarks plug in others
        self.consumer: Consumer | None = None
        self.connection: AbstractRobustConnection | None = None
        # A caller's tracer provider (tests, embedding) stays the caller's to shut down; else the OTEL_* variables.
        self._tracer_provider = tracer_provider
        self.breakers = BreakerBoard(settings.breaker, on_change=self._breaker_changed)

    def _breaker_changed(self, breaker: CircuitBreaker) -> None:
        self.metrics.breaker_state(breaker.tenant_id, breaker.endpoint, breaker.state.value)
        if breaker.state is BreakerState.OPEN:
            # With no traffic nothing would look at the breaker again: the gauge must still turn half-open
            # when the cooldown passes, since that is the state the next request will meet.
            asyncio.get_running_loop().call_later(breaker.policy.cooldown_s, breaker.current_state)

    def stop(self, *, force: bool = False) -> None:
        """Drain: finish in-flight work for up to `grace_s`. `force`: return it to the queue now."""
        if force and not self._force.is_set():
            log.warning("worker_forced_stop", in_flight=self.consumer.in_flight if self.consumer else 0)
            self._force.set()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _has_config_file(self, tenant_id: str) -> bool:
        return self.registry.get(tenant_id) is not None or self.registry.problems(tenant_id) is not None

    def _warn_short_patience(self) -> None:
        """A queue_and_retry request without a deadline waits for an open circuit as long as its attempts
        could take on the ladder; if that is shorter than the cooldown, it fails before the next probe."""
        cooldown = self.settings.breaker.cooldown_s
        ladder = self.settings.ladder
        for tenant_id in self.registry.tenants():
            tenant = self.registry.get(tenant_id)
            if tenant is None or tenant.fallback.policy is not FallbackPolicy.QUEUE_AND_RETRY:
                continue
            patience = ladder.span_s(tenant.fallback.max_attempts)
            if patience < cooldown:
                log.warning(
                    "patience_shorter_than_cooldown",
                    tenant_id=tenant_id,
                    max_attempts=tenant.fallback.max_attempts,
                    patience_s=round(patience, 3),
                    breaker_cooldown_s=cooldown,
                    fix="raise max_attempts or the retry ladder, or lower --breaker-cooldown",
                )

    def checks(self) -> dict[str, bool]:
        """What `/readyz` requires; every check is a cheap attribute read (probes come every few seconds)."""
        connection = self.connection
        consumer = self.consumer
        return {
            "started": self.ready.is_set(),
            "broker_connected": connection is not None and connection.connected.is_set(),
            "consuming": consumer is not None and consumer.consuming,
            # A faulty tenants source would make BYOC tenants look unconfigured (and be rerouted): not ready, and
            # the app stops consuming until it is healthy again.
            "tenant_source_healthy": self.registry.healthy,
            "tenants_watched": self.tenants_watched,
            "not_draining": not self.draining,
        }

    def _gauges_read_at_scrape(self) -> None:
        """Gauges read at scrape time, so the hot path never updates them."""
        metrics = self.metrics
        metrics.in_flight.set_function(lambda: self.consumer.in_flight if self.consumer else 0)
        metrics.consuming.set_function(lambda: 1 if self.consumer is not None and self.consumer.consuming else 0)
        metrics.ready.set_function(lambda: 1 if all(self.checks().values()) else 0)
        metrics.tenants.set_function(lambda: len(self.registry.tenants()))
        metrics.tenants_quarantined.set_function(lambda: len(self.registry.quarantined()))
        metrics.tenants_stale.set_function(lambda: len(self.registry.stale()))
        metrics.tenant_source_healthy.set_function(lambda: 1 if self.registry.healthy else 0)

    def _settled(self, settled: Settled) -> None:
        self.metrics.observe(settled)
        if self._on_settled is not None:
            self._on_settled(settled)

    def _tracing(self) -> Tracing:
        if self._tracer_provider is not None:
            return Tracing(self._tracer_provider, genai=self.metrics.genai, capture_content=content_capture_requested())
        return tracing_from_env(self.metrics.genai)

    async def run(self) -> None:
        settings = self.settings
        # Before anything opens: a bad reference fails the start.
        header_key, previous_keys = load_keys(settings.header_key, settings.header_key_previous)
        # Only with publisher rules do the worker's copies carry its user: a user_id the broker disagrees with
        # (an external login it cannot be told from the URL) would make it refuse every retry and dead letter.
        worker_user = login_user(settings.amqp_url) if settings.publishers.active else None
        if settings.publishers.users and worker_user is None:
            # Its own retries and replays could not be told from a stranger's: every one would be refused.
            raise StartupError(
                ExitCode.USAGE,
                "--publisher rules need the worker's own AMQP user: with auth=external, name it in AMQP_URL "
                "(amqps://USER@HOST/?auth=external)",
            )
        async with AsyncExitStack() as stack:
            if settings.metrics_port is not None:
                # First, so liveness answers while the broker connection is still being made.
                self._gauges_read_at_scrape()
                health = serve_health(self.checks, self.metrics.registry, settings.metrics_host, settings.metrics_port)
                await stack.enter_async_context(health)
            lag = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag, settings.loop_lag_interval_s))
            stack.callback(lag.cancel)
            self._load_tenants()

            connection = await connect_worker(settings.amqp_url, settings.namespace, settings.connect_timeout_s)
            stack.push_async_callback(connection.close)
            self.connection = connection
            session = egress_session(
                settings.tenant_egress,
                # No connection cap per host: each tenant's `max_concurrency` already bounds its calls, and a
                # cap here would queue calls inside aiohttp while their timeout runs.
                limit=0,
                limit_per_host=0,
                ttl_dns_cache=300,
            )
            stack.push_async_callback(session.close)
            tracing = self._tracing()
            if self._tracer_provider is None:
                stack.push_async_callback(asyncio.to_thread, tracing.shutdown)  # flushes buffered spans

            spec = topology_spec(settings.topology, settings.ladder, delivery_limit=settings.delivery_limit)
            channels = await open_channels(connection, spec, settings.atlas_cloud_exchange, settings.prefetch)
            providers = ProviderPool(session, self._provider_factories, self.breakers, tracing)
            stack.push_async_callback(providers.aclose)  # after the drain, before the session closes
            trust = HeaderTrust(settings.topology, header_key, previous_keys)
            self.consumer = self._consumer(channels, providers, tracing, trust, worker_user)
            if settings.freeze_heap:
                freeze_heap()  # everything is imported and built; what follows is per request
            if header_key is None:  # said once the start succeeds, so a failed start stays one line
                log.warning(
                    "header_key_missing",
                    risk="the worker's own headers (atlas-attempts, atlas-history) and x-death are believed "
                    "unsigned, so a publisher can forge a request's attempts and history",
                    fix="run with --header-key env:NAME (the same key on every replica)",
                )
            await self.consumer.start()
            watcher = asyncio.create_task(self._watch_tenants())
            watcher.add_done_callback(_report_watch_end)
            stack.callback(watcher.cancel)
            self.ready.set()
            log.info(
                "worker_started",
                namespace=settings.namespace,
                prefetch=settings.prefetch,
                queue=settings.topology.requests,
            )

            await self._stop.wait()
            watcher.cancel()
            await self._drain(self.consumer)
            with contextlib.suppress(Exception):
                await channels.consume.close()

    def _load_tenants(self) -> None:
        settings = self.settings
        try:
            scan_directory(settings.tenants_dir)  # a wrong path is the operator's to fix: one line, no log
        except TenantSourceFault as fault:
            raise StartupError(ExitCode.TENANT_SOURCE, f"tenants directory: {fault}") from None
        self.registry.refresh()
        if self.registry.fault is not None:
            raise StartupError(ExitCode.TENANT_SOURCE, f"tenants directory: {self.registry.fault}")
        log.info(
            "tenants_loaded",
            directory=str(settings.tenants_dir),
            tenants=self.registry.tenants(),
            quarantined=self.registry.quarantined(),
        )
        self._warn_short_patience()

    def _router(self, providers: ProviderPool, tracing: Tracing) -> Router:
        """Handling, with Test Connection plugged in here: only the composition root knows `connection_check`."""
        draft_egress = self.settings.draft_egress

        async def test_connection(request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
            return await answer_test_connection(request, ctx, self.registry, providers, draft_egress)

        return Router(self.registry, Handler(providers, self.settings.ladder, tracing), test_connection)

    def _consumer(
        self,
        channels: WorkerChannels,
        providers: ProviderPool,
        tracing: Tracing,
        trust: HeaderTrust,
        worker_user: str | None,
    ) -> Consumer:
        """The message path, wired: consumer → handler → providers, and the settler behind them."""
        settings = self.settings
        handler = self._router(providers, tracing)
        settler = Settler(
            channels.publish,
            settings.topology,
            settings.atlas_cloud_exchange,
            worker_user=worker_user,
            trust=trust,
            max_body_bytes=settings.max_body_bytes,
            tracing=tracing,
        )
        return Consumer(
            channels.requests,
            handler,
            settler,
            on_settled=self._settled,
            publishers=settings.publishers,
            max_body_bytes=settings.max_body_bytes,
            max_body_entries=settings.max_body_entries,
            tracing=tracing,
        )

    async def _drain(self, consumer: Consumer) -> None:
        self.draining = True
        self.ready.clear()
        log.info("worker_draining", in_flight=consumer.in_flight, grace_s=self.settings.grace_s)
        returned = await consumer.drain(self.settings.grace_s, force=self._force)
        log.info(
            "worker_stopped",
            returned_to_queue=len(returned),
            returned_request_ids=returned[:RETURNED_IDS_LOGGED],
            forced=self._force.is_set(),
        )

    def _tenant_source_fault(self, reason: str) -> None:
        self.metrics.tenant_source_faults.inc()

    @property
    def tenant_source_ready(self) -> bool:
        """Answers are only right while the tenant source is healthy and watched (the README's rules)."""
        return self.registry.healthy and self.tenants_watched

    async def _watch_tenants(self) -> None:
        """Reload tenant files, and consume only while the source can be trusted. `refresh` records every fault
        instead of raising, and a failed pause or resume is logged and tried again on the next pass."""
        self.tenants_watched = True
        try:
            while True:
                try:
                    await self._gate_consumption()
                except Exception:
                    log.exception("consumption_gate_failed", action="trying again at the next reload")
                await asyncio.sleep(self.settings.tenants_poll_s)
                self.registry.refresh()
        finally:
            self.tenants_watched = False

    async def _gate_consumption(self) -> None:
        consumer = self.consumer
        if consumer is None or self.draining:
            return
        if self.tenant_source_ready and not consumer.consuming:
            await consumer.start()
            log.info("consuming_resumed", reason="tenant source healthy")
        elif not self.tenant_source_ready and consumer.consuming:
            await consumer.stop_consuming()
            log.warning("consuming_paused", reason=self.registry.fault or "tenant watcher not running")


def _report_watch_end(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tenant_watch_stopped", error=repr(task.exception()), action="not ready, not consuming")

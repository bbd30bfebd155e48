"""The composition root: opens the broker connection, HTTP session and registry, runs the consumer, drains."""

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AsyncExitStack

import aio_pika
import structlog
from opentelemetry.trace import TracerProvider

from contracts import FallbackPolicy
from worker.broker.consumer import Consumer, Settled
from worker.broker.header_trust import HeaderTrust, load_key
from worker.broker.settle import Settler
from worker.broker.topology import declare, declare_atlas_cloud, topology_spec
from worker.exit_codes import ExitCode, StartupError, broker_error, first_connection
from worker.handling.handler import Handler
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
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
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
        header_key = load_key(settings.header_key)  # before anything opens: a bad reference fails the start
        async with AsyncExitStack() as stack:
            if settings.metrics_port is not None:
                # First, so liveness answers while the broker connection is still being made.
                await stack.enter_async_context(serve_health(self, settings.metrics_host, settings.metrics_port))
            lag = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag, settings.loop_lag_interval_s))
            stack.callback(lag.cancel)
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

            connection = await self._connect()
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

            publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            spec = topology_spec(settings.topology, settings.ladder, delivery_limit=settings.delivery_limit)
            await declare(publish_channel, spec)
            await declare_atlas_cloud(connection, settings.atlas_cloud_exchange)

            consume_channel = await connection.channel(publisher_confirms=False)
            await consume_channel.set_qos(prefetch_count=settings.prefetch)
            # Declared (not just looked up) on this channel so the robust connection re-consumes it after a reconnect.
            requests_spec = spec.queues[0]
            requests = await consume_channel.declare_queue(
                requests_spec.name, durable=True, arguments=requests_spec.arguments
            )

            providers = ProviderPool(session, self._provider_factories, self.breakers, tracing)
            handler = Handler(
                self.registry, providers, settings.ladder, draft_egress=settings.draft_egress, tracing=tracing
            )
            settler = Settler(
                publish_channel,
                settings.topology,
                settings.atlas_cloud_exchange,
                trust=HeaderTrust(settings.topology, header_key),
                max_body_bytes=settings.max_body_bytes,
                tracing=tracing,
            )
            self.consumer = Consumer(
                requests,
                handler,
                settler,
                on_settled=self._settled,
                publishers=settings.publishers,
                max_body_bytes=settings.max_body_bytes,
                tracing=tracing,
            )
            if settings.freeze_heap:
                freeze_heap()  # everything is imported and built; what follows is per request
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
            self.draining = True
            watcher.cancel()
            self.ready.clear()
            log.info("worker_draining", in_flight=self.consumer.in_flight, grace_s=settings.grace_s)
            returned = await self.consumer.drain(settings.grace_s, force=self._force)
            log.info(
                "worker_stopped",
                returned_to_queue=len(returned),
                returned_request_ids=returned[:RETURNED_IDS_LOGGED],
                forced=self._force.is_set(),
            )
            with contextlib.suppress(Exception):
                await consume_channel.close()

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

    async def _connect(self) -> aio_pika.abc.AbstractRobustConnection:
        settings = self.settings
        try:
            # Only the first connection is bounded in time: once connected, the robust connection reconnects.
            with first_connection():
                return await asyncio.wait_for(
                    aio_pika.connect_robust(
                        settings.amqp_url, client_properties={"connection_name": f"atlas-worker:{settings.namespace}"}
                    ),
                    settings.connect_timeout_s,
                )
        except (OSError, aio_pika.exceptions.AMQPError) as exc:  # TimeoutError is an OSError
            raise broker_error(exc, settings.amqp_url) from None


def _report_watch_end(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tenant_watch_stopped", error=repr(task.exception()), action="not ready, not consuming")

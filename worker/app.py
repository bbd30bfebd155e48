"""The composition root: opens the broker connection, HTTP session and registry, runs the consumer, drains."""

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AsyncExitStack

import aio_pika
import aiohttp
import structlog
from opentelemetry.trace import TracerProvider

from worker.breaker import BreakerBoard
from worker.consumer import Consumer, Settled
from worker.exit_codes import broker_error, first_connection
from worker.handler import Handler
from worker.ops.health import serve_health
from worker.ops.loop_lag import watch_loop_lag
from worker.ops.metrics import Metrics
from worker.providers import ProviderFactory, ProviderPool
from worker.settings import WorkerSettings
from worker.settle import Settler
from worker.tenants import TenantRegistry
from worker.topology import declare, declare_atlas_cloud, topology_spec
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
        self.registry = TenantRegistry(settings.tenants_dir)
        self.ready = asyncio.Event()
        self.draining = False
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._on_settled = on_settled
        self._provider_factories = provider_factories  # None: the real providers; benchmarks plug in others
        self.consumer: Consumer | None = None
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.metrics = Metrics(self._has_config_file)
        # A caller's tracer provider (tests, embedding) stays the caller's to shut down; else the OTEL_* variables.
        self._tracer_provider = tracer_provider
        self.breakers = BreakerBoard(
            settings.breaker_failures,
            settings.breaker_cooldown_s,
            on_change=lambda b: self.metrics.breaker_state(b.tenant_id, b.endpoint, b.state.value),
        )

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
        async with AsyncExitStack() as stack:
            if settings.metrics_port is not None:
                # First, so liveness answers while the broker connection is still being made.
                await stack.enter_async_context(serve_health(self, settings.metrics_host, settings.metrics_port))
            lag = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag, settings.loop_lag_interval_s))
            stack.callback(lag.cancel)
            self.registry.refresh()
            log.info("tenants_loaded", directory=str(settings.tenants_dir), tenants=self.registry.tenants())
            watcher = asyncio.create_task(self.registry.watch(settings.tenants_poll_s))
            stack.callback(watcher.cancel)

            connection = await self._connect()
            stack.push_async_callback(connection.close)
            self.connection = connection
            session = aiohttp.ClientSession(
                # No connection cap per host: each tenant's `max_concurrency` already bounds its calls, and a
                # cap here would queue calls inside aiohttp while their timeout runs.
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
                raise_for_status=False,
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
            handler = Handler(self.registry, providers, settings.ladder, tracing=tracing)
            settler = Settler(publish_channel, settings.topology, settings.atlas_cloud_exchange, tracing)
            self.consumer = Consumer(requests, handler, settler, on_settled=self._settled, tracing=tracing)
            await self.consumer.start()
            self.ready.set()
            log.info(
                "worker_started",
                namespace=settings.namespace,
                prefetch=settings.prefetch,
                queue=settings.topology.requests,
            )

            await self._stop.wait()
            self.draining = True
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

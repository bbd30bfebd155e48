"""The HTTP side of a worker: `/healthz` (alive), `/readyz` (able to take work), `/metrics` (Prometheus)."""

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

from worker.exit_codes import ExitCode, StartupError

if TYPE_CHECKING:
    from worker.app import WorkerApp

Checks = Callable[[], dict[str, bool]]


def worker_checks(app: "WorkerApp") -> dict[str, bool]:
    """What `/readyz` requires; every check is a cheap attribute read (probes come every few seconds)."""
    connection = app.connection
    consumer = app.consumer
    return {
        "started": app.ready.is_set(),
        "broker_connected": connection is not None and connection.connected.is_set(),
        "consuming": consumer is not None and consumer.consuming,
        # A faulty tenants source would make BYOC tenants look unconfigured (and be rerouted): not ready, and
        # the app stops consuming until it is healthy again.
        "tenant_source_healthy": app.registry.healthy,
        "tenants_watched": app.tenants_watched,
        "not_draining": not app.draining,
    }


class HealthServer:
    def __init__(self, checks: Checks, registry: CollectorRegistry, *, host: str = "0.0.0.0", port: int) -> None:
        self._checks = checks
        self._registry = registry
        self._host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = self._checks()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        # The 0.0.4 text format is what every Prometheus version scrapes.
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


@asynccontextmanager
async def serve_health(app: "WorkerApp", host: str, port: int) -> AsyncIterator[HealthServer]:
    """Serve the app's probes and metrics on `host:port` until the context exits."""
    metrics = app.metrics

    def checks() -> dict[str, bool]:
        return worker_checks(app)

    # Gauges read at scrape time, so the hot path never updates them.
    metrics.in_flight.set_function(lambda: app.consumer.in_flight if app.consumer else 0)
    metrics.consuming.set_function(lambda: 1 if app.consumer is not None and app.consumer.consuming else 0)
    metrics.ready.set_function(lambda: 1 if all(checks().values()) else 0)
    metrics.tenants.set_function(lambda: len(app.registry.tenants()))
    metrics.tenants_quarantined.set_function(lambda: len(app.registry.quarantined()))
    metrics.tenant_source_healthy.set_function(lambda: 1 if app.registry.healthy else 0)
    server = HealthServer(checks, metrics.registry, host=host, port=port)
    try:
        await server.start()
    except OSError as exc:  # in use, or an address this host does not have
        await server.stop()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(ExitCode.METRICS_PORT_IN_USE, f"cannot serve metrics on {host}:{port}: {reason}") from None
    try:
        yield server
    finally:
        await server.stop()

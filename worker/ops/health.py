"""The HTTP side of a worker: `/healthz` (alive), `/readyz` (able to take work), `/metrics` (Prometheus)."""

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from worker.exit_codes import ExitCode, StartupError

# What `/readyz` requires, by name; the app that owns the state supplies them.
Checks = Callable[[], dict[str, bool]]


class HealthServer:
    def __init__(self, checks: Checks, registry: CollectorRegistry, *, host: str = "0.0.0.0", port: int) -> None:
        self._checks = checks
        # Compression off: the response is the same bytes whatever the scraper accepts.
        self._exposition = make_aiohttp_handler(registry, disable_compression=True)
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

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        # Without an Accept header the library answers in the 0.0.4 text format, which every Prometheus
        # version scrapes; negotiating OpenMetrics would change what existing scrapers and dashboards read.
        return await self._exposition(request.clone(headers={}))


@asynccontextmanager
async def serve_health(
    checks: Checks, registry: CollectorRegistry, host: str, port: int
) -> AsyncIterator[HealthServer]:
    """Serve `checks` as probes and `registry` as metrics on `host:port` until the context exits."""
    server = HealthServer(checks, registry, host=host, port=port)
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

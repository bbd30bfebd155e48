"""A local OTLP/HTTP trace receiver: decodes each export with opentelemetry-proto, as a collector would."""

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass
class OtlpReceiver:
    exports: list[ExportTraceServiceRequest] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    refusals: list[int] = field(default_factory=list)  # statuses to answer the next exports with, in turn
    retry_after: str | None = None  # the Retry-After header sent with each refusal
    times: list[float] = field(default_factory=list)  # when each export arrived (monotonic)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    endpoint: str = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        self.times.append(time.monotonic())
        if self.refusals:
            retry = {"retry-after": self.retry_after} if self.retry_after is not None else None
            return web.Response(status=self.refusals.pop(0), headers=retry)
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.exports.append(export)
        self.content_types.append(request.content_type)
        self.arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def spans(self) -> list[Span]:
        return [span for e in self.exports for rs in e.resource_spans for ss in rs.scope_spans for span in ss.spans]

    def service_names(self) -> set[str]:
        return {
            attr.value.string_value
            for e in self.exports
            for rs in e.resource_spans
            for attr in rs.resource.attributes
            if attr.key == "service.name"
        }

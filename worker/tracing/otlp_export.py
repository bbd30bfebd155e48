"""Span export on the event loop: each span encoded as it ends, batches posted over OTLP/HTTP with aiohttp."""

import asyncio
import contextvars
import gzip
import math
import random
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import structlog
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from worker.tracing.otlp_config import BatchLimits, OtlpTarget
from worker.tracing.otlp_encoding import Group, encode_ended, encode_request, encode_span

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Span
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from worker.tracing.spans import LightSpan

log = structlog.get_logger("worker.tracing.otlp_export")

RETRYABLE: Final = frozenset({429, 502, 503, 504})  # as the SDK's OTLP/HTTP exporter
MAX_ATTEMPTS: Final = 6
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024  # the SDK exporter's default limit, before compression
COMPRESS_ON_LOOP_BYTES: Final = 256 * 1024  # bigger batches (prompts captured, say) are compressed on a thread
MAX_RESPONSE_BYTES: Final = 64 * 1024  # of a collector's answer, read and dropped
USER_AGENT: Final = "atlas-inference-worker OTLP/HTTP"

Entry = tuple["Resource", "InstrumentationScope | None", bytes]


class LoopSpanExport(SpanProcessor):
    """A batch span processor and OTLP/HTTP exporter in one, living on the event loop.

    The SDK's batch processor hands spans to a thread that encodes and sends them; on a worker whose event loop
    is busy, that thread's Python competes with the loop for the GIL, and the handovers cost the loop more than
    the encoding itself. Here a span is encoded as it ends (a few microseconds: `otlp_encoding`), its bytes
    queued, and a full batch (or, every schedule delay, whatever is queued) posted by a task on the same loop.
    Spans ended on another thread are queued as well; their batch is posted on the loop."""

    def __init__(self, target: OtlpTarget, limits: BatchLimits) -> None:
        self.target = target
        self.limits = limits
        self._queue: list[Entry] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._timer: asyncio.TimerHandle | None = None
        self._exporting: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._dropped = 0
        self._closed = False
        headers = {"content-type": "application/x-protobuf", "user-agent": USER_AGENT, **target.headers}
        if target.compression != "none" and "content-encoding" not in headers:
            headers["content-encoding"] = target.compression
        self._headers = headers

    # --- the span processor's side, called as spans end ---

    def on_start(self, span: "Span", parent_context: "Context | None" = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self._add((span.resource, span.instrumentation_scope, encode_span(span)))

    def on_end_light(
        self, span: "LightSpan", end_time: int, resource: "Resource", scope: "InstrumentationScope"
    ) -> None:
        """`on_end` for a `worker.tracing.spans.LightSpan`, encoded from its values without building a ReadableSpan."""
        context = span.context
        if context.trace_flags & 1:  # sampled; a span only recorded is not exported, as by the SDK
            encoded = encode_ended(
                context,
                span.parent,
                span.name,
                span.kind,
                span.start_time,
                end_time,
                span.attributes,
                span.events,
                span.links,
                span.status,
            )
            self._add((resource, scope, encoded))

    def _add(self, entry: Entry) -> None:
        queue = self._queue
        if self._closed or len(queue) >= self.limits.max_queue_size:
            self._dropped += 1
            return
        queue.append(entry)
        if self._loop is None:
            self._adopt_running_loop()
        if len(queue) == self.limits.max_export_batch_size:
            self._wake()

    def _adopt_running_loop(self) -> None:
        """The loop that ends spans posts them: found on the first span, then timed every schedule delay."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # a span ended outside any loop: queued until a flush
            return
        self._loop_thread = threading.get_ident()
        self._timer = self._loop.call_later(self.limits.schedule_delay_s, self._tick)

    def _tick(self) -> None:
        if self._loop is not None and not self._closed:
            self._timer = self._loop.call_later(self.limits.schedule_delay_s, self._tick)
        self._start_export(everything=True)

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_closed():  # that loop has ended: spans now end on another, or none
            # Its session and export task are bound to it: they cannot be closed or awaited any more.
            self._loop, self._session, self._exporting = None, None, None
            self._adopt_running_loop()
            loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._start_export()
        else:
            loop.call_soon_threadsafe(self._start_export)

    def _start_export(self, everything: bool = False) -> None:
        if self._queue and self._loop is not None and (self._exporting is None or self._exporting.done()):
            # In an empty context: the task must not run under (and keep alive) the span that filled the batch.
            export = self._export_queued(everything)
            self._exporting = self._loop.create_task(export, context=contextvars.Context())

    # --- the exporter's side, on the loop ---

    async def _export_queued(self, everything: bool) -> None:
        """Full batches, while spans keep ending (a part batch waits for the timer); with `everything`, also
        what was queued when it began (not what ends meanwhile: under load that would be a tiny batch per post)."""
        left = len(self._queue) if everything else 0
        while len(self._queue) >= self.limits.max_export_batch_size or (left > 0 and self._queue):
            batch = self._queue[: self.limits.max_export_batch_size]
            del self._queue[: len(batch)]
            left -= len(batch)
            if self._dropped:
                log.warning("tracing_spans_dropped", spans=self._dropped, max_queue_size=self.limits.max_queue_size)
                self._dropped = 0
            await self._post(encode_request(_grouped(batch)), len(batch))

    async def _post(self, data: bytes, spans: int) -> None:
        if len(data) > MAX_REQUEST_BYTES:
            log.warning("tracing_batch_too_large", size=len(data), max_request_size=MAX_REQUEST_BYTES, spans=spans)
            return
        if len(data) > COMPRESS_ON_LOOP_BYTES and self.target.compression == "gzip":
            body = await asyncio.to_thread(_compressed, data, self.target.compression)  # big: off the loop
        else:
            body = _compressed(data, self.target.compression)
        deadline = time.monotonic() + self.target.timeout_s
        for attempt in range(MAX_ATTEMPTS):
            status, retry_after, error = await self._send(body, max(deadline - time.monotonic(), 0.001))
            if status is not None and 200 <= status < 300:
                return
            retryable = status in RETRYABLE if status is not None else error is not None
            backoff = retry_after if retry_after is not None else 2**attempt * random.uniform(0.8, 1.2)
            if not retryable or attempt + 1 == MAX_ATTEMPTS or backoff > deadline - time.monotonic() or self._closed:
                log.error("tracing_export_failed", status=status, error=error, spans=spans, attempts=attempt + 1)
                return
            await asyncio.sleep(backoff)

    async def _send(self, body: bytes, timeout_s: float) -> tuple[int | None, float | None, str | None]:
        """One POST: its status and Retry-After, or the connection error that stopped it."""
        try:
            if self._session is None or self._session.closed:
                # In the try: a CA bundle or client key that cannot be read fails this post, not the export task.
                # Off the loop: a CA bundle (or the system's store) is read and parsed, tens of milliseconds.
                context = await asyncio.to_thread(self.target.ssl_context)
                connector = aiohttp.TCPConnector(ssl=context or True, limit=2)
                # Not trust_env: aiohttp would then read ~/.netrc on a thread for every request.
                self._session = aiohttp.ClientSession(connector=connector)
            async with self._session.post(
                self.target.endpoint,
                data=body,
                headers=self._headers,
                proxy=self.target.proxy,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                # Not followed: a redirect would carry the spans and the OTEL headers (API keys) to another host.
                allow_redirects=False,
            ) as response:
                await response.content.read(MAX_RESPONSE_BYTES)  # a collector's answer is small; never all of it
                return response.status, _seconds(response.headers.get("retry-after")), None
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return None, None, repr(error)
        except Exception as error:  # e.g. no thread left for a name lookup at interpreter exit: never raised
            return None, None, repr(error)

    async def _flush(self, close: bool) -> None:
        if close:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
        running = self._exporting
        if running is not None and not running.done():
            await asyncio.shield(running)
        await self._export_queued(everything=True)
        if close and self._session is not None:
            await self._session.close()

    # --- shutting down and flushing, from any thread ---

    def shutdown(self) -> None:
        if not self._closed:
            self._run(lambda: self._flush(close=True), self.limits.export_timeout_s)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._run(lambda: self._flush(close=False), timeout_millis / 1000)

    def _run(self, flush: Callable[[], Awaitable[None]], timeout_s: float) -> bool:
        """Run a flush on the spans' loop and wait for it; on that loop's own thread it can only be scheduled."""
        loop = self._loop
        if loop is not None and loop.is_running():
            if threading.get_ident() == self._loop_thread:
                loop.create_task(_awaited(flush), context=contextvars.Context())
                return False
            future = asyncio.run_coroutine_threadsafe(_awaited(flush), loop)
            try:
                future.result(timeout_s)
            except TimeoutError:
                future.cancel()
                log.warning("tracing_flush_timed_out", timeout_s=timeout_s, spans=len(self._queue))
                return False
            return True
        # No loop (spans ended outside one) or it has stopped: a loop of our own, with a session of its own.
        self._loop, self._session, self._timer, self._exporting = None, None, None, None

        async def flush_and_close() -> None:
            try:
                await flush()
            finally:
                if self._session is not None:  # bound to this loop, which ends here
                    await self._session.close()
                    self._session = None

        try:
            asyncio.run(asyncio.wait_for(flush_and_close(), timeout_s))
        except TimeoutError:
            log.warning("tracing_flush_timed_out", timeout_s=timeout_s, spans=len(self._queue))
            return False
        return True


async def _awaited(make: Callable[[], Awaitable[None]]) -> None:
    await make()


def _grouped(batch: list[Entry]) -> list[Group]:
    """The batch's spans by resource and scope, both compared by identity (hashing a Resource is costly)."""
    groups: dict[tuple[int, int], tuple[Any, Any, list[bytes]]] = {}
    for resource, scope, encoded in batch:
        key = (id(resource), id(scope))
        group = groups.get(key)
        if group is None:
            group = groups[key] = (resource, scope, [])
        group[2].append(encoded)
    return list(groups.values())


def _compressed(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "deflate":
        return zlib.compress(data)
    return data


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None  # an HTTP date: the usual backoff instead
    # float() reads "nan" and "inf" too: a NaN delay makes uvloop's call_later raise, asyncio's misorder its timers.
    return max(seconds, 0.0) if seconds is not None and math.isfinite(seconds) else None

"""The broker socket: every AMQP frame written in one event-loop turn leaves in one send.

aiormq's writer task hands each queued frame (a publish, an ack) to `StreamWriter.write`, and both asyncio's
and uvloop's transports send at once when nothing is buffered: one system call per frame. The worker settles
many deliveries per loop turn, so its frames are gathered here and sent together at the end of the turn, in
the order they were written. `drain`, `write_eof` and `close` send what is gathered first, so aiormq's
handshake, its waits for the socket and its closing frames behave as before.

Plugged in through aiormq's own `TransportFactory`, which aio-pika passes on from the connection's kwargs.
"""

import asyncio
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL


class CoalescingWriter:
    """A `StreamWriter` whose writes of one loop turn go to the socket as one write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._failed: BaseException | None = None  # raised to the next writer, as the socket would have

    def write(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._send)
        self._pending.append(data)

    def _send(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            self._writer.write(pending[0] if len(pending) == 1 else b"".join(pending))
        except Exception as exc:  # the transport is closed: aiormq learns it at its next write or drain
            self._failed = exc

    async def drain(self) -> None:
        self._send()
        if self._failed is not None:
            raise self._failed
        await self._writer.drain()

    def write_eof(self) -> None:
        self._send()
        self._writer.write_eof()

    def close(self) -> None:
        self._send()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, transport, wait_closed, get_extra_info, …) is the real writer's.
        return getattr(self._writer, name)


class CoalescingTransport(TransportFactory):
    """The connection aiormq would open for the URL (TLS for `amqps`), its writer coalescing."""

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await inner.create(url, **kwargs)
        # Duck-typed: aiormq only calls the StreamWriter methods this class provides or passes on.
        return reader, CoalescingWriter(writer)  # type: ignore[return-value]


class CoalescingRobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, each (re)connection opened through `CoalescingTransport`."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransport()

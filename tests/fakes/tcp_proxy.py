"""A TCP proxy on 127.0.0.1 that can cut every connection through it, to test broker connection loss."""

import asyncio
import contextlib


class TcpProxy:
    """Forwards `127.0.0.1:<port>` to a target; `cut()` drops live connections, `pause()` refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._accepting = True
        self._upstream_flowing = asyncio.Event()  # cleared by `hold`: what clients send waits in the proxy
        self._upstream_flowing.set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every live connection at once, as a failed network link would."""
        self.cuts += 1
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()
        self._writers.clear()

    def pause(self) -> None:
        self._accepting = False

    def resume(self) -> None:
        self._accepting = True

    def hold(self) -> None:
        """Keep what clients send in the proxy (a slow link to the broker) until `release`; nothing is lost."""
        self._upstream_flowing.clear()

    def release(self) -> None:
        self._upstream_flowing.set()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if not self._accepting:
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, upstream_writer}
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer, self._upstream_flowing),
            self._pipe(upstream_reader, client_writer, None),
            return_exceptions=True,
        )
        self._writers -= {client_writer, upstream_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event | None) -> None:
        try:
            while data := await reader.read(65536):
                if flowing is not None:
                    await flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()

"""A raw HTTP server for egress tests: answers every request with one canned response and records each hit."""

import asyncio
import gzip
import zlib
from dataclasses import dataclass, field

import orjson

# A small gzip body that inflates far past any response cap: 256 MiB of zeros in about 250 KB.
BOMB_INFLATED_BYTES = 256 * 1024 * 1024


def gzip_bomb() -> bytes:
    """Compressed chunk by chunk, so building it never holds the inflated body in memory."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: a gzip container
    zeros = bytes(1024 * 1024)
    parts = [packer.compress(zeros) for _ in range(BOMB_INFLATED_BYTES // len(zeros))]
    return b"".join(parts) + packer.flush()


@dataclass
class Hit:
    request_line: str
    headers: dict[str, str]


@dataclass
class CannedResponse:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"{}"
    declared_length: int | None = None  # a Content-Length that need not match the body

    def encode(self) -> bytes:
        length = len(self.body) if self.declared_length is None else self.declared_length
        lines = [f"HTTP/1.1 {self.status} Canned", f"Content-Length: {length}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def redirect(status: int, location: str) -> CannedResponse:
    return CannedResponse(status, {"Location": location}, b'{"secret": "body of the redirect"}')


def json_response(data: object, status: int = 200) -> CannedResponse:
    return CannedResponse(status, {"Content-Type": "application/json"}, orjson.dumps(data))


def gzip_response(body: bytes) -> CannedResponse:
    return CannedResponse(200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, body)


def gzipped_json(data: object) -> CannedResponse:
    return gzip_response(gzip.compress(orjson.dumps(data)))


class HostileServer:
    """Listens on `host` (0.0.0.0 for "an address the policy refuses that still lands on loopback")."""

    def __init__(self, response: CannedResponse | None = None, host: str = "127.0.0.1") -> None:
        self.response = response or json_response({})
        self.hits: list[Hit] = []
        self._host = host
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> "HostileServer":
        self._server = await asyncio.start_server(self._serve, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
            length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
            await reader.readexactly(length)
            self.hits.append(Hit(head[0], {k.lower(): v for k, v in headers.items()}))
            writer.write(self.response.encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

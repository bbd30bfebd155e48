"""A minimal OpenAI-compatible HTTP server with a fixed latency, cheap enough not to skew the benchmarks.

Raw asyncio (no web framework): the benchmark should measure the worker, not the stand-in provider.
Run as `python -m bench.fake_provider --latency 0.2`; it prints `listening <port>` and serves until SIGTERM.
"""

import argparse
import asyncio
import contextlib
import signal
import time
from typing import cast

import orjson

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checkout is failing because the payments database connection pool is exhausted "
                    "since the 14:02 deploy; the deploy is being rolled back.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 612, "completion_tokens": 31, "total_tokens": 643},
    }
)
UNAVAILABLE = orjson.dumps({"error": {"message": "The server is overloaded.", "type": "server_error"}})


def _response(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Error")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class _Connection(asyncio.Protocol):
    def __init__(self, server: "FixedLatencyServer") -> None:
        self._server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport is a `Transport` in behaviour; uvloop's does not derive from asyncio's.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            body, self._buffer = self._buffer[head_end + 4 : end], self._buffer[end:]
            self._server.handle(self, head.split(" ", 2)[1], body)

    def send(self, payload: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(payload)


class FixedLatencyServer:
    """Answers every chat completion after `latency_s` (or with a 503 when `fail`), on one or more hosts."""

    def __init__(self, latency_s: float = 0.0, *, fail: bool = False, record: bool = False) -> None:
        self.latency_s = latency_s
        self.fail = fail
        self.record = record
        self.port = 0
        self.served = 0
        self.arrivals: list[tuple[str, float]] = []  # (last user message, monotonic time) when `record`
        self._servers: list[asyncio.Server] = []

    async def start(self, hosts: tuple[str, ...] = ("127.0.0.1",)) -> int:
        loop = asyncio.get_running_loop()
        for host in hosts:
            server = await loop.create_server(lambda: _Connection(self), host, self.port, backlog=4096)
            self.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        return self.port

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    def handle(self, connection: _Connection, path: str, body: bytes) -> None:
        if self.record:
            messages = orjson.loads(body).get("messages", [])
            self.arrivals.append((str(messages[-1].get("content", "")), time.monotonic()))
        status, payload = (503, UNAVAILABLE) if self.fail else (200, COMPLETION)
        response = _response(status if path.endswith("/chat/completions") else 404, payload)
        self.served += 1
        if self.latency_s:
            asyncio.get_running_loop().call_later(self.latency_s, connection.send, response)
        else:
            connection.send(response)


async def _main(latency_s: float, hosts: tuple[str, ...]) -> None:
    server = FixedLatencyServer(latency_s)
    port = await server.start(hosts)
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    print(f"served {server.served}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--hosts", default="127.0.0.1", help="comma-separated loopback addresses to listen on")
    args = parser.parse_args()
    asyncio.run(_main(args.latency, tuple(args.hosts.split(","))))


if __name__ == "__main__":
    main()

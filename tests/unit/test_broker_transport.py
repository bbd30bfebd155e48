"""The broker socket: frames written in one loop turn leave as one send, in order; drain and close send first."""

import asyncio

import pytest

from worker.broker.transport import CoalescingWriter


async def _pair() -> tuple[asyncio.StreamWriter, asyncio.Queue[bytes], asyncio.Server]:
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.put_nowait(data)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    return writer, received, server


class CountingWriter:
    """A real socket's writer, counting the writes handed to it."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def _read(received: asyncio.Queue[bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await asyncio.wait_for(received.get(), 5)
    return data


async def test_frames_of_one_loop_turn_reach_the_socket_as_one_write_in_their_order() -> None:
    writer, received, server = await _pair()
    counting = CountingWriter(writer)
    coalescing = CoalescingWriter(counting)  # type: ignore[arg-type]
    for frame in (b"publish-1;", b"publish-2;", b"ack;"):
        coalescing.write(frame)
    assert counting.writes == []  # nothing sent inside the turn

    assert await _read(received, 24) == b"publish-1;publish-2;ack;"
    assert counting.writes == [b"publish-1;publish-2;ack;"]
    coalescing.close()
    server.close()


async def test_drain_and_close_send_what_is_gathered_at_once() -> None:
    writer, received, server = await _pair()
    counting = CountingWriter(writer)
    coalescing = CoalescingWriter(counting)  # type: ignore[arg-type]
    coalescing.write(b"header;")
    await coalescing.drain()  # as aiormq does after its handshake frames
    assert counting.writes == [b"header;"]

    coalescing.write(b"close;")
    coalescing.close()  # aiormq's last frame, written just before the socket closes
    assert counting.writes == [b"header;", b"close;"]
    assert await _read(received, 13) == b"header;close;"
    server.close()


class ClosedWriter(CountingWriter):
    """A writer whose socket is gone: uvloop raises on a write to a closed handle."""

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")


async def test_a_send_that_failed_is_raised_to_aiormqs_next_write_and_drain() -> None:
    writer, _, server = await _pair()
    coalescing = CoalescingWriter(ClosedWriter(writer))  # type: ignore[arg-type]
    coalescing.write(b"lost;")
    await asyncio.sleep(0)  # the gathered frames are sent (and fail) at the end of the turn

    with pytest.raises(RuntimeError, match="closed"):
        coalescing.write(b"next;")
    with pytest.raises(RuntimeError, match="closed"):
        await coalescing.drain()
    writer.close()
    server.close()

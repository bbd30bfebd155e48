"""What every provider fake shares: a local aiohttp server on 127.0.0.1 and faults queued on command."""

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

# Faults every fake understands; each fake may add its own (content filter, quota, …).
FaultKind = Literal[
    "rate_limit",
    "server_error",
    "hang",
    "malformed",
    "truncated",
    "context_overflow",
    "quota",
    "content_filter",
    "content_filter_prompt",
    "forbidden",
    "model_not_ready",
]


@dataclass
class Fault:
    kind: FaultKind
    retry_after_s: float | None = None


@dataclass
class FaultQueue:
    """Faults consumed one per model call, then `always` while set."""

    queued: deque[Fault] = field(default_factory=deque)
    always: Fault | None = None

    def push(self, *faults: Fault) -> None:
        self.queued.extend(faults)

    def next(self) -> Fault | None:
        return self.queued.popleft() if self.queued else self.always


class LocalServer:
    """Starts an aiohttp app on an ephemeral port of 127.0.0.1."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def serve(self, app: web.Application) -> str:
        # A hung handler must not hold the test up at shutdown.
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def openai_shaped(
    messages: Any, tools: Any = None, tool_choice: Any = None, json_output: bool = False
) -> dict[str, Any]:
    """A Chat Completions-shaped body, so the demo stand-in model can answer any provider's request."""
    body: dict[str, Any] = {"messages": messages, "model": "standin"}
    if tools:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if json_output:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {}}}
    return body

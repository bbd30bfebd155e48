"""An OpenAI-compatible tenant endpoint that fails about 30 % of requests, deterministically per request.

Which requests fail, and how, follows from a hash of the request id the soak writes into each prompt (so
each request's fate is fixed, and the soak can recompute it): 5xx, 429 with retry-after, a hang past the
tenant's timeout, or a garbage 200 body. A faulty request keeps failing for its first `faulty_calls` calls
(or for ever), so when a kill makes the worker process a request twice, both runs meet the same provider
behaviour and must reach the same answer.
"""

import asyncio
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from demo.standin_model import completion

FAULTS = ("server_error", "rate_limit", "hang", "garbage")
FATE_KEY = re.compile(r"\[(chaos-\d+)\]")  # the request id the soak puts in each incident title


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "server_error"}}, status=status, headers=headers)


@dataclass
class FaultyProvider:
    api_key: str
    fault_rate: float = 0.3
    hang_s: float = 3.0
    faulty_calls: tuple[int | None, ...] = (None,)  # None: for ever; else the first N calls fail
    base_url: str = ""
    calls: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)  # fault kind (or "ok") → answers given
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def fate(self, key: str) -> tuple[str | None, int | None]:
        """(fault kind or None, how many calls fail) for a request id; the same id always gets the same."""
        digest = hashlib.sha256(key.encode()).digest()
        draw = int.from_bytes(digest[:4], "big") / 2**32
        if draw >= self.fault_rate:
            return None, 0
        return FAULTS[digest[4] % len(FAULTS)], self.faulty_calls[digest[5] % len(self.faulty_calls)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.served["unauthorized"] += 1
            return _error(401, "Incorrect API key provided.")
        body: dict[str, Any] = orjson.loads(await request.read())
        prompt = "\n".join(str(m.get("content") or "") for m in body.get("messages", []))
        found = FATE_KEY.search(prompt)
        key = found.group(1) if found else prompt
        kind, faulty = self.fate(key)
        self.calls[key] += 1
        if kind is not None and (faulty is None or self.calls[key] <= faulty):
            self.served[kind] += 1
            return await self._fault(kind)
        self.served["ok"] += 1
        return web.json_response(completion(body))

    async def _fault(self, kind: str) -> web.StreamResponse:
        if kind == "server_error":
            return _error(503, "The server is overloaded.")
        if kind == "rate_limit":
            return _error(429, "Rate limit reached. Please try again later.", **{"retry-after": "0.3"})
        if kind == "hang":
            await asyncio.sleep(self.hang_s)  # past the tenant's timeout; bounded so the server can close
            return _error(504, "gateway timeout")
        return web.Response(body=b'{"choices": [ {"mess', content_type="application/json")

"""A bound on the entries of all requests in flight: what their parsed objects cost in memory and collector time."""

import asyncio
import contextlib


class EntriesInFlight:
    """A weighted semaphore: a request holds its entries from before it is validated until it is settled, and
    waits while it does not fit beside those in flight.

    Per request, `--max-body-entries` bounds the time validation takes; this bounds what all the requests alive
    at once cost: about 270 bytes of memory per entry, and the cyclic collector's passes over every one of them
    (a million entries alive make a pass of over 100 ms). Whoever fits goes: waiting requests are let in in
    arrival order as room frees, each as soon as it fits, so a small request never waits behind a large one
    (another tenant's, perhaps hostile, perhaps held by a hanging provider)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def held(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._waiting)

    async def acquire(self, entries: int) -> None:
        entries = min(entries, self.limit)  # a request alone always fits
        if self._held + entries <= self.limit:
            self._held += entries
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((entries, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # let in just as it was cancelled: give the room back
                self.release(entries)
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove((entries, turn))
            raise

    def release(self, entries: int) -> None:
        self._held -= min(entries, self.limit)
        if self._waiting:
            self._let_in()

    def _let_in(self) -> None:
        still = []
        for entries, turn in self._waiting:
            if turn.done():  # cancelled; its task has not yet run to take itself out
                continue
            if self._held + entries <= self.limit:
                self._held += entries
                turn.set_result(None)
            else:
                still.append((entries, turn))
        self._waiting = still

"""Counting a JSON document's entries without parsing it: parsing holds the GIL for a time that follows the entries,
not the bytes, so a document with too many is refused before anything parses it."""

import asyncio
import re
from concurrent.futures import Executor
from typing import Final

# The scan below reads at most this many bytes per regex call: a call holds the GIL, and a thread that holds it
# for long (one 4 MiB string read in one call) stalls the event loop as surely as running on it would.
SCAN_WINDOW_BYTES: Final = 64 * 1024
_TO_STRUCTURE: Final = re.compile(rb'[^"{\[,]*+([{\[,"])')  # to the next entry or string, outside strings
_IN_STRING: Final = re.compile(rb"(?:[^\"\\]++|\\.)*+", re.DOTALL)  # up to a closing quote, escapes skipped
_QUOTE: Final = ord('"')
_NOT_STRUCTURAL: Final = bytes(set(range(256)) - set(b"{[,"))


def entries_may_exceed(body: bytes, limit: int) -> bool:
    """False when `body` cannot hold more than `limit` entries: it has no more braces, brackets and commas,
    wherever they are. One pass, cheap enough for every delivery, and exact enough for nearly all of them."""
    return len(body) > limit and len(body.translate(None, _NOT_STRUCTURAL)) > limit


def count_entries(body: bytes, stop_after: int, window: int = SCAN_WINDOW_BYTES) -> int:
    """The entries in JSON `body` (object members plus array elements; an empty object or array counts as one),
    counting no further than `stop_after` + 1, which it also returns for a body with more strings than that many
    entries can hold (two per member and one more), valid JSON or not. Linear in the body's length, with one
    Python step per entry, string and window, and at most `window` bytes read per regex call: on a thread, the
    event loop gets the GIL back within a switch interval."""
    if window < 2:  # a window must hold a backslash and what it escapes
        raise ValueError(f"window is {window} bytes; it must be at least 2")
    entries = strings = position = 0
    end = len(body)
    while position < end and entries <= stop_after:
        found = _TO_STRUCTURE.match(body, position, position + window)
        if found is None:  # none in this window
            position += window
            continue
        position = found.end()
        if found[1] != b'"':
            entries += 1
            continue
        strings += 1
        if strings > 2 * stop_after + 1:
            return stop_after + 1
        while position < end:  # to the string's closing quote, a window at a time
            limit = min(position + window, end)
            part = _IN_STRING.match(body, position, limit)  # matches always, if only nothing
            stop = part.end() if part else position
            if stop < limit and body[stop] == _QUOTE:
                position = stop + 1
                break
            if stop == position:  # a backslash with nothing after it: the body ends inside this string
                return entries
            position = stop  # the window ended, perhaps between a backslash and what it escapes
    return entries


async def exceeds(body: bytes, limit: int, counter: Executor | None = None) -> bool:
    """Whether JSON `body` holds more than `limit` entries: ruled out on the loop in one pass when it can be, else
    counted on `counter` (the loop's default pool if None), so the loop never holds the GIL for the count."""
    if not entries_may_exceed(body, limit):
        return False
    return await asyncio.get_running_loop().run_in_executor(counter, count_entries, body, limit) > limit

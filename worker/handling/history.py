"""A request's attempt history: built by the handler, carried across ladder hops in `atlas-history`."""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from pydantic import ValidationError

from contracts import HISTORY_ENTRIES, AttemptRecord
from worker.errors import ProviderError

# The header stays this small however long the story: oldest entries go first. Ten entries take ~1.5 KiB.
HISTORY_MAX_BYTES: Final = 2048
CODE_LIMIT: Final = 64  # codes are the worker's own short names; the cut keeps a hostile one from filling the header

History = tuple[AttemptRecord, ...]


def record(exc: ProviderError, *, provider_called: bool, level: int | None, delay_s: float | None) -> AttemptRecord:
    """The entry for one failed try; `delay_s` is when it is due back, None when it is not coming back."""
    now = datetime.now(UTC).replace(microsecond=0)
    return AttemptRecord(
        at=now,
        error_class=exc.error_class.value,
        code=exc.code[:CODE_LIMIT],
        provider_called=provider_called,
        level=level,
        next_attempt_at=now + timedelta(seconds=delay_s) if delay_s is not None else None,
    )


def extended(history: Sequence[AttemptRecord], entry: AttemptRecord) -> History:
    return (*history, entry)[-HISTORY_ENTRIES:]


def encode(history: Sequence[AttemptRecord]) -> str:
    """Compact JSON for the header, the newest entries kept and the whole under HISTORY_MAX_BYTES."""
    entries = [e.model_dump(mode="json", exclude_none=True) for e in history[-HISTORY_ENTRIES:]]
    while True:
        text = orjson.dumps(entries).decode()
        if len(text) <= HISTORY_MAX_BYTES or not entries:
            return text
        entries.pop(0)


def decode(value: Any) -> History:
    """The history in a header the worker vouched for; anything unreadable counts as none."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or len(value) > HISTORY_MAX_BYTES:
        return ()
    try:
        data = orjson.loads(value)
        if not isinstance(data, list):
            return ()
        return tuple(AttemptRecord.model_validate(e) for e in data[-HISTORY_ENTRIES:])
    except (orjson.JSONDecodeError, ValidationError, TypeError):
        return ()


decode_history = decode  # the name importers use beside their own `history` fields

"""Header readers: the worker's own `atlas-*` headers and the broker's `x-death`, read defensively."""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from contracts import Header, LastProviderError
from worker.broker.limits import MAX_COUNT
from worker.handling import history
from worker.handling.history import History

Headers = Mapping[str, Any] | None


def read_count(headers: Headers, name: str) -> int:
    """A non-negative count from a header: anything that is not an int (bools included) or is negative
    counts as 0; anything huge is clamped to MAX_COUNT."""
    value = (headers or {}).get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return 0
    return min(value, MAX_COUNT)


def read_text(value: Any) -> str | None:
    """A header value as text (AMQP long strings may arrive as bytes); None when empty or not text."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def read_time(value: Any) -> datetime | None:
    """A timestamp, as the broker writes it (a datetime) or the worker does (ISO text); naive means UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def first_failure_at(believed: Headers) -> datetime | None:
    """When the request first failed, as the worker wrote it (always with a zone: anything else is not ours)."""
    value = (believed or {}).get(Header.FIRST_FAILURE_AT)
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def last_error(believed: Headers) -> LastProviderError | None:
    """The provider error our headers recorded at the last real attempt (circuit waits do not overwrite it)."""
    believed = believed or {}
    code, text, error_class = (believed.get(h) for h in (Header.ERROR_CODE, Header.ERROR_MESSAGE, Header.ERROR_CLASS))
    if not isinstance(code, str) or not isinstance(text, str):
        return None
    return LastProviderError(code=code, message=text, error_class=error_class if isinstance(error_class, str) else None)


def read_history(headers: Headers) -> History:
    """The attempt history in `atlas-history`; only meaningful on headers the worker vouched for."""
    return history.decode((headers or {}).get(Header.HISTORY))


def latest_death(headers: Headers) -> Mapping[str, Any]:
    """The broker's most recent `x-death` entry (RabbitMQ keeps it first); empty when there is none."""
    deaths = (headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}

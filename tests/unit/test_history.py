"""A request's attempt history stays bounded in entries and bytes, and a bad header reads as none."""

import orjson

from worker.broker.limits import encoded_size
from worker.errors import ErrorClass, ProviderError
from worker.handling import history
from worker.ops.dlq import history_table


def failure(code: str) -> ProviderError:
    return ProviderError(ErrorClass.TRANSIENT, "the provider is down", code=code)


def test_the_header_keeps_the_newest_ten_entries_under_its_byte_bound() -> None:
    told: history.History = ()
    for n in range(50):
        entry = history.record(failure(f"code_{n}" + "x" * 500), provider_called=n % 2 == 0, level=0, delay_s=1.0)
        told = history.extended(told, entry)

    text = history.encode(told)

    assert len(told) == 10
    assert len(text) <= history.HISTORY_MAX_BYTES
    assert (encoded_size("atlas-history", text) or 0) < history.HISTORY_MAX_BYTES + 64
    kept = orjson.loads(text)
    assert kept[-1]["code"].startswith("code_49")  # the newest survive
    assert all(len(e["code"]) <= history.CODE_LIMIT for e in kept)
    assert history.decode(text) == told[-len(kept) :]


def test_an_unreadable_or_oversized_header_is_no_history() -> None:
    for value in (None, 3, "not json", "{}", '[{"code": 1}]', "[" + " " * 5000 + "]", b"\xff"):
        assert history.decode(value) == ()


def test_show_renders_a_refusal_and_a_wait_readably() -> None:
    called = history.record(failure("unreachable"), provider_called=True, level=0, delay_s=0.2)
    refused = history.record(failure("circuit_open"), provider_called=False, level=None, delay_s=None)

    title, header, first, second = history_table((called, refused))

    assert title == "history (oldest first):"
    assert header.split() == ["AT", "CLASS", "CODE", "CALLED", "LEVEL", "NEXT", "TRY"]
    assert first.split()[1:5] == ["transient", "unreachable", "yes", "0"]
    assert second.split()[1:] == ["transient", "circuit_open", "no", "(circuit", "open)", "-", "-"]

"""A request body's entries are counted without reading it: the bound that keeps validation's time on the loop short."""

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import samples
from worker.broker.consumer import decode
from worker.handling.outcome import Malformed, MalformedCode
from worker.json_entries import count_entries, entries_may_exceed

UNLIMITED = 10**9
# Strings full of what the scan must not mistake for structure: quotes, escapes, brackets and commas.
TRICKY_TEXT = st.text(alphabet='",{[]}:\\ aé\n', max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TRICKY_TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TRICKY_TEXT, children, max_size=5),
    max_leaves=40,
)


def entries(value: Any) -> int:
    """Object members plus array elements, an empty object or array counting as one."""
    if isinstance(value, dict):
        return (len(value) or 1) + sum(entries(v) for v in value.values())
    if isinstance(value, list):
        return (len(value) or 1) + sum(entries(v) for v in value)
    return 0


def as_json(value: Any, spaced: bool = False) -> bytes:
    if spaced:  # whitespace everywhere it may go, non-ASCII escaped
        return json.dumps(value, indent=1).encode()
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@given(JSON_VALUES, st.booleans(), st.integers(min_value=2, max_value=9))
def test_the_count_is_the_number_of_members_and_elements_however_the_json_is_written(
    value: Any, spaced: bool, window: int
) -> None:
    body = as_json(value, spaced)

    assert count_entries(body, UNLIMITED) == entries(value)
    # Read a few bytes at a time, strings and escapes are cut at every place they can be, and the count holds.
    assert count_entries(body, UNLIMITED, window) == entries(value)
    if entries(value):  # the quick look never hides an entry: with one fewer allowed, it cannot rule out too many
        assert entries_may_exceed(body, entries(value) - 1)


@given(JSON_VALUES, st.integers(min_value=0, max_value=20))
def test_counting_stops_one_past_the_limit(value: Any, limit: int) -> None:
    assert count_entries(as_json(value), limit) == min(entries(value), limit + 1)


@pytest.mark.parametrize(
    ("body", "counted"),
    [
        (b'{"log": "a, b, [c], {d}", "n": [1, 2]}', 4),
        (rb'{"quote": "say \"{[,\"", "n": 1}', 2),
        (b'"\\"\\"\\"' * 10_000, 0),  # every quote escaped: one unterminated string, read once
        (b'{"a": "never closed, {[' + b"x" * 100_000, 1),
        (b'{"a": 1}' + b" " * 100_000, 1),  # a long tail with nothing in it ends the scan once
    ],
)
def test_strings_hide_structure_and_broken_json_ends_the_scan(body: bytes, counted: int) -> None:
    assert count_entries(body, UNLIMITED) == counted


def test_more_strings_than_the_entries_allowed_could_hold_count_as_too_many() -> None:
    # Valid JSON holds at most two strings per entry and one more; 4 MiB of empty strings is not JSON, and is
    # refused without reading it all, one Python step per string.
    assert count_entries(b'""' * 2_000_000, 100) == 101
    assert count_entries(orjson.dumps({"k": "v"}), 1) == 1  # two strings, one entry: within


async def test_a_body_within_bytes_but_over_the_entries_is_refused_before_it_is_validated() -> None:
    request = samples.request("acme", request_id="many")
    request["incident"]["alerts"] = [{"name": ""}] * 1_000
    body = orjson.dumps(request)

    refused = await decode(body, max_entries=1_000)
    accepted = await decode(body, max_entries=3_000)

    assert isinstance(refused, Malformed)
    assert refused.code is MalformedCode.BODY_TOO_LARGE
    assert "more than 1,000 entries" in refused.message
    assert not isinstance(accepted, Malformed)
    assert accepted.incident is not None
    assert len(accepted.incident.alerts) == 1_000


async def test_an_invalid_collection_is_reported_by_its_first_bad_item_not_one_error_per_item() -> None:
    request = samples.request("acme", request_id="broken")
    request["incident"]["alerts"] = [{}] * 10_000  # each alert lacks its name
    request["incident"]["metadata"] = {f"key-{n}": n for n in range(10_000)}  # each value is not a string

    refused = await decode(orjson.dumps(request))

    assert isinstance(refused, Malformed)
    assert refused.code is MalformedCode.INVALID_REQUEST
    assert refused.message == "incident.alerts.0.name: Field required (+1 more)"  # and metadata's first

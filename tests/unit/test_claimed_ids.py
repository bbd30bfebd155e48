"""The ids a body that is not a valid request claims, read from its head: what its rejection and dead letter carry."""

import json
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from tests import samples
from worker.broker.claimed_ids import HEAD_BYTES, MAX_LEADING_MEMBERS, leading_ids, parsed_ids

# Ids full of what the scan must not mistake for the end of a string or a member: quotes, escapes, commas, braces.
TRICKY_ID = st.text(alphabet='",{[]}:\\ aé\n\u2028\U0001f600', min_size=1, max_size=40)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_ID
)


def dumped(value: Any, style: int) -> bytes:
    if style == 0:
        return orjson.dumps(value)
    if style == 1:  # whitespace everywhere it may go, non-ASCII escaped
        return json.dumps(value, indent=2).encode()
    return json.dumps(value, separators=(" , ", " : "), ensure_ascii=False).encode()


@given(
    request_id=TRICKY_ID,
    tenant_id=TRICKY_ID,
    task=TRICKY_ID,
    before=st.dictionaries(st.sampled_from(["schema_version", "x", "deadline"]), SCALARS, max_size=3),
    rest=st.dictionaries(st.text(max_size=8), st.lists(SCALARS, max_size=3) | SCALARS, max_size=4),
    style=st.sampled_from([0, 1, 2]),
    cut=st.integers(min_value=0, max_value=60),
)
def test_leading_string_ids_are_read_as_a_parser_reads_them_even_from_a_body_cut_short(
    request_id: str, tenant_id: str, task: str, before: dict[str, Any], rest: dict[str, Any], style: int, cut: int
) -> None:
    head = before | {"request_id": request_id, "tenant_id": tenant_id, "task": task}
    body = dumped(head | {"incident": {"nested": [1, {"request_id": "not-this"}]}} | rest, style)
    whole = orjson.loads(body)
    expected = (whole["request_id"], whole["tenant_id"], whole["task"])
    ids_end = len(dumped(head, style)) - 1  # up to the member after the ids: the rest may be cut anywhere

    assert leading_ids(body) == expected
    assert parsed_ids(body) == expected
    assert leading_ids(body[: ids_end + 2 + cut]) == expected


def test_an_id_after_a_nested_member_is_not_claimed_from_the_head_but_is_from_a_parsed_body() -> None:
    body = orjson.dumps({"incident": {"tenant_id": "nested"}, "request_id": "r-1", "tenant_id": "acme"})

    assert leading_ids(body) == (None, None, None)
    assert parsed_ids(body) == ("r-1", "acme", None)
    assert leading_ids(body[:-1]) == (None, None, None)  # not JSON: only the head is read
    assert parsed_ids(body[:-1]) == (None, None, None)


def test_a_sample_request_cut_anywhere_after_its_ids_still_names_them() -> None:
    body = orjson.dumps(samples.request("acme", request_id="r-7"))

    for cut in range(body.index(b'"incident"'), len(body), 97):
        assert leading_ids(body[:cut]) == ("r-7", "acme", "summary")


def test_ids_that_are_not_strings_or_not_decodable_are_none_and_long_ones_are_cut() -> None:
    assert leading_ids(b'{"request_id": 12, "tenant_id": null, "task": true}') == (None, None, None)
    assert leading_ids(b'{"request_id": "\\ud800", "tenant_id": "bad\\q", "task": "ok"}') == (None, None, "ok")
    assert leading_ids(b'{"request_id": "' + b"r" * 300 + b'"}') == ("r" * 200, None, None)
    assert leading_ids(b'{"request_id": "first", "request_id": "last"}') == ("last", None, None)


def test_what_is_not_an_object_head_claims_nothing() -> None:
    for body in [b"", b"[]", b'["request_id", "r"]', b'"request_id"', b"{not json", b"\x00\xff{", b"{{"]:
        assert leading_ids(body) == (None, None, None)


def test_only_the_head_is_read_however_long_the_body_is() -> None:
    spaces_first = b"{" + b" " * HEAD_BYTES + b'"request_id": "r-1"}'
    long_member_first = b'{"padding": "' + b"x" * HEAD_BYTES + b'", "request_id": "r-1"}'
    many_members_first = b"{" + b"".join(b'"m%d": 1, ' % n for n in range(MAX_LEADING_MEMBERS)) + b'"request_id": "r"}'

    assert leading_ids(spaces_first) == (None, None, None)
    assert leading_ids(long_member_first) == (None, None, None)
    assert leading_ids(many_members_first) == (None, None, None)
    assert leading_ids(many_members_first.replace(b'"m0": 1, ', b"", 1)) == ("r", None, None)

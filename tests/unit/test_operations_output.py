"""What dead-letter commands print: masked secrets, readable ages, clean replay headers."""

from datetime import UTC, datetime

import orjson
import pytest

from contracts import Header, Topology
from worker.broker.copies import replay_headers
from worker.broker.header_trust import HeaderTrust
from worker.ops.dlq import DeadLetterView, detail, format_age, signed_again
from worker.redaction import MASK, redact, redact_text


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abcdef0123456789", "abcdef0123456789"),
        ("call failed with key sk-proj-Zx81bq9Lw", "Zx81bq9Lw"),
        ("AWS AKIAIOSFODNN7EXAMPLE denied", "IOSFODNN7EXAMPLE"),
        ("amqp://svc:s3cret@rabbit:5672/", "s3cret"),
        ("GET https://x.openai.azure.com/?api-key=deadbeef42&x=1", "deadbeef42"),
        ("db password=hunter2 rejected", "hunter2"),
        ('{"client_secret": "abc123xyz"}', "abc123xyz"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "dozjgNryP4J3"),
    ],
)
def test_secret_shapes_are_masked_in_free_text(text: str, secret: str) -> None:
    masked = redact_text(text)
    assert secret not in masked
    assert MASK in masked


def test_secret_fields_are_masked_but_counters_stay() -> None:
    shown = redact({"api_key": "anything", "incident": {"password": "pw"}, "max_output_tokens": 512, "title": "ok"})
    assert shown == {"api_key": MASK, "incident": {"password": MASK}, "max_output_tokens": 512, "title": "ok"}


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "?"), (5, "5s"), (60, "1m"), (125, "2m5s"), (7260, "2h1m"), (90000, "1d1h")]
)
def test_ages_read_like_an_operator_would_say_them(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


def test_replayed_request_keeps_publisher_headers_and_drops_failure_history() -> None:
    headers = {
        "traceparent": "00-1-2-01",
        Header.ATTEMPTS: 4,
        Header.REASON: "exhausted",
        Header.ERROR_CODE: "timeout",
        Header.DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
        "x-death": [{"reason": "expired"}],
        "x-first-death-reason": "expired",
        "atlas-replays": 1,
        Header.SETTLE_SEQ: 3,
        Header.LAST_PROVIDER_ERROR_CODE: "timeout",
        "CC": ["acme.summary"],  # the broker would route the replay to these keys too
        "Bcc": ["acme.rca"],
    }
    fresh = replay_headers(headers, keep_attempts=False)
    assert set(fresh) == {"traceparent", "atlas-replays", "atlas-replayed-at", Header.SETTLE_SEQ}
    assert fresh["atlas-replays"] == 2
    assert fresh[Header.SETTLE_SEQ] == 4  # the replay's reply outranks the dead-lettered one
    assert replay_headers(headers, keep_attempts=True)[Header.ATTEMPTS] == 4


def view_of(body: bytes) -> DeadLetterView:
    return DeadLetterView("id-1", None, None, None, "malformed", None, 0, None, {}, {}, body)


def test_show_escapes_bytes_that_are_not_text_and_masks_text_bodies() -> None:
    assert detail(view_of(b"\x1b[2J\x00oops"))["body"] == "(9 bytes, not text) b'\\x1b[2J\\x00oops'"
    assert detail(view_of(b"{not json, password=hunter2"))["body"] == "{not json, password=***"
    assert detail(view_of(b'{"api_key": "k-1", "n": 1}'))["body"] == {"api_key": MASK, "n": 1}


def test_a_signed_replay_vouches_only_for_what_the_key_already_vouched_for() -> None:
    # A message the broker dead-lettered itself keeps its publisher's forged atlas-* headers: re-signing them
    # would make the workers believe them.
    trust = HeaderTrust(Topology("ns"), b"a-key-only-the-workers-know")
    genuine = {Header.ATTEMPTS: 2, Header.SETTLE_SEQ: 3}
    forged = {Header.REROUTED_FROM_TENANT: "victim", Header.DEFERRALS: 99}
    headers = genuine | forged | trust.signature("r-1", genuine) | {"traceparent": "00-1-2-01"}
    body = orjson.dumps({"request_id": "r-1", "tenant_id": "acme", "task": "summary"})
    view = DeadLetterView("id-1", "r-1", "acme", "summary", "exhausted", None, 2, None, headers, {}, body)

    copy = signed_again(trust, view, keep_attempts=True)

    assert trust.believed(copy, "r-1") == {Header.ATTEMPTS: 2, Header.SETTLE_SEQ: 4}
    assert not set(forged) & set(copy)
    assert copy["traceparent"] == "00-1-2-01"
    assert trust.believed(signed_again(trust, view, keep_attempts=False), "r-1") == {Header.SETTLE_SEQ: 4}

"""Bounds without a broker: header tables that always fit a frame, clamped counts, which worker headers are
believed, escaped operator output, probe slots, closed metric labels, the security flags."""

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pamqp.encode import field_table

from contracts import ErrorInfo, Header, Topology
from tests.ops.cli import atlas_worker
from tests.unit.test_operations_metrics import reply, scrape
from worker.broker.consumer import Received, Settled, delivery_context
from worker.broker.header_trust import HeaderTrust, load_key
from worker.broker.headers import read_count
from worker.broker.limits import HEADER_BUDGET_BYTES, MAX_COUNT, bounded_body, bounded_headers
from worker.exit_codes import StartupError
from worker.handling.outcome import DeadLetter, DeadLetterReason, DeliveryContext, Reply, RequestIds, SettleResult
from worker.handling.route import PROBES_IN_FLIGHT, TenantSlots
from worker.ops.dlq import escaped
from worker.ops.metrics import Metrics

TOPOLOGY = Topology("t")
KEY = b"k" * 32


def test_publisher_headers_are_dropped_before_ours_so_the_table_fits_the_budget() -> None:
    publisher = {f"x-pad-{n}": "p" * 16_000 for n in range(8)}
    ours = {Header.REASON: "malformed", Header.ERROR_MESSAGE: "m" * 1000}

    headers = bounded_headers(publisher, ours)

    assert len(field_table(headers)) <= HEADER_BUDGET_BYTES
    assert headers[Header.REASON] == "malformed"
    assert headers[Header.HEADERS_DROPPED] == 8 - sum(k.startswith("x-pad") for k in headers)
    assert headers[Header.HEADERS_DROPPED] >= 2


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, [1, 2**64], {"nested": 2**70}, object()])
def test_a_header_that_cannot_be_encoded_is_dropped_not_fatal(value: Any) -> None:
    headers = bounded_headers({"x-odd": value, "x-fine": "yes"}, {Header.REASON: "malformed"})
    assert "x-odd" not in headers
    assert headers["x-fine"] == "yes"
    assert headers[Header.HEADERS_DROPPED] == 1
    field_table(headers)  # encodes


def test_nothing_dropped_means_no_drop_header() -> None:
    assert bounded_headers({"x-a": 1}, {"atlas-b": 2}) == {"x-a": 1, "atlas-b": 2}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3), (2**63 - 1, MAX_COUNT), (-1, 0), (-(2**63), 0), (True, 0), ("3", 0), (2.5, 0), (None, 0)],
)
def test_counts_read_from_headers_are_clamped(value: Any, expected: int) -> None:
    assert read_count({Header.ATTEMPTS: value}, Header.ATTEMPTS) == expected


def test_a_body_over_the_limit_is_cut_to_a_prefix_with_headers_saying_so() -> None:
    assert bounded_body(b"small", 10) == (b"small", {})
    # Over a limit set below the prefix's size: the prefix is the whole body, so nothing says it was cut.
    assert bounded_body(b"x" * 5_000, 1_000) == (b"x" * 5_000, {})
    body, cut = bounded_body(b"x" * 200_000, 100_000)
    assert len(body) < 100_000
    assert cut == {Header.BODY_TRUNCATED: True, Header.ORIGINAL_BODY_BYTES: 200_000}


def test_signed_headers_are_believed_only_for_their_own_request_and_values() -> None:
    trust = HeaderTrust(TOPOLOGY, KEY)
    ours = {Header.ATTEMPTS: 2, Header.FIRST_FAILURE_AT: "2026-01-01T00:00:00+00:00", Header.REASON: "x"}
    signed = {**ours, **trust.signature("r-1", ours)}

    assert trust.believed(signed, "r-1") == {k: v for k, v in ours.items() if k != Header.REASON}
    assert trust.believed(signed, "r-2") == {}
    assert trust.believed({**signed, Header.ATTEMPTS: 9}, "r-1") == {
        Header.FIRST_FAILURE_AT: ours[Header.FIRST_FAILURE_AT]
    }
    assert HeaderTrust(TOPOLOGY, b"another key!!!!!").believed(signed, "r-1") == {}
    assert trust.believed(ours, "r-1") == {}  # unsigned


def test_a_key_being_rotated_out_is_still_believed_but_never_signed_with() -> None:
    old, new = HeaderTrust(TOPOLOGY, KEY), HeaderTrust(TOPOLOGY, b"the next key!!!!!", previous=(KEY,))
    ours = {Header.ATTEMPTS: 2}
    by_old = {**ours, **old.signature("r-1", ours)}
    by_new = {**ours, **new.signature("r-1", ours)}

    assert new.believed(by_old, "r-1") == ours  # retries and dead letters signed before the rollout
    assert new.believed(by_new, "r-1") == ours
    assert by_new[Header.SIGNATURE] != by_old[Header.SIGNATURE]  # it signs with the new key only
    assert old.believed(by_new, "r-1") == {}
    assert HeaderTrust(TOPOLOGY, b"the next key!!!!!").believed(by_old, "r-1") == {}  # once the old key is dropped


def test_without_a_key_only_a_message_back_from_a_retry_level_is_believed() -> None:
    trust = HeaderTrust(TOPOLOGY)
    attempts = {Header.ATTEMPTS: 2}
    from_ladder = [{"queue": "t.retry.3", "reason": "expired"}]
    assert trust.believed({**attempts, "x-death": from_ladder}, "r") == attempts
    assert trust.believed(attempts, "r") == {}
    assert trust.believed({**attempts, "x-death": [{"queue": "other.retry.3", "reason": "expired"}]}, "r") == {}
    assert trust.believed({**attempts, "x-death": [{"queue": "t.requests", "reason": "rejected"}]}, "r") == {}
    assert trust.signature("r", attempts) == {}


def test_the_header_key_is_a_reference_read_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADER_KEY", "0123456789abcdef0123")
    assert load_key("env:HEADER_KEY") == b"0123456789abcdef0123"
    assert load_key(None) is None
    monkeypatch.setenv("SHORT_KEY", "short")
    with pytest.raises(StartupError, match="at least"):
        load_key("env:SHORT_KEY")
    with pytest.raises(StartupError, match="MISSING_KEY"):
        load_key("env:MISSING_KEY")


@pytest.mark.parametrize("text", ["a\nFORGED row", "\x1b[2J", "\x1b]0;title\x07", "\u202eevil", "\x9b31m"])
def test_operator_output_escapes_control_characters(text: str) -> None:
    shown = escaped(text)
    assert shown.isprintable()
    assert "\n" not in shown


def test_probes_share_the_tenants_slots_and_a_worker_wide_cap() -> None:
    slots = TenantSlots()
    assert slots.try_acquire_probe("acme", 2)
    assert slots.try_acquire_probe("acme", 2)
    assert not slots.try_acquire_probe("acme", 2)
    slots.release_probe("acme")
    assert slots.try_acquire_probe("acme", 2)
    taken = sum(slots.try_acquire_probe(f"tenant-{n}", 2) for n in range(100))
    assert taken == PROBES_IN_FLIGHT - 2


def test_label_values_a_publisher_makes_up_fold_into_other() -> None:
    metrics = Metrics({"acme"}.__contains__)
    error = ErrorInfo(code="invalid_request", message="m")
    for n in range(20):
        # Values outside the enums, as a newer worker sharing the metrics might report.
        outcome = Reply(None, DeadLetter(cast(DeadLetterReason, f"reason-{n}"), error, provider_kind=f"kind-{n}"))
        done = cast(SettleResult, f"done-{n}")
        metrics.observe(Settled(RequestIds("r", "acme", f"task-{n}"), outcome, done, 1.0))
    metrics.observe(Settled(RequestIds("r", "acme", "rca"), Reply(reply("acme")), SettleResult.REPLIED, 1.0))

    rows = scrape(metrics).rows
    labels = {(k, v) for _, row_labels, _ in rows for k, v in row_labels.items()}
    assert {v for k, v in labels if k == "task"} == {"other", "rca"}
    assert {v for k, v in labels if k == "reason"} == {"other"}
    assert {v for k, v in labels if k == "result"} == {"other", "replied"}
    assert {v for k, v in labels if k == "provider_kind"} == {"other", "azure_openai"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--header-key", "the-key-itself"], "takes a reference"),
        (["--publisher", "no-tenants"], "expected USER=TENANT"),
    ],
)
async def test_bad_security_flags_fail_the_start_with_one_line(flags: list[str], message: str, tmp_path: Path) -> None:
    result = await atlas_worker("run", "--tenants", str(tmp_path), *flags)
    assert result.code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "the-key-itself" not in result.stderr


@pytest.mark.parametrize("flag", ["--max-body-bytes", "--max-body-entries"])
@pytest.mark.parametrize(
    ("value", "why"), [("0", "0 is not a positive number"), ("4MB", "'4MB' is not a whole number")]
)
async def test_a_body_bound_that_is_not_a_positive_number_is_refused_at_start(
    flag: str, value: str, why: str, tmp_path: Path
) -> None:
    result = await atlas_worker("run", "--tenants", str(tmp_path), flag, value)
    assert result.code == 2
    assert result.stderr.strip().splitlines()[-1].endswith(f"argument {flag}: {why}")


@pytest.mark.parametrize("redelivered", [False, True])
def test_a_first_delivery_reads_as_no_attempts_and_a_vouched_one_reads_every_header(redelivered: bool) -> None:
    received = Received(12.5, datetime(2026, 12, 2, tzinfo=UTC))
    message = cast(Any, SimpleNamespace(redelivered=redelivered, body=b"{}"))
    assert delivery_context(message, {}, received) == DeliveryContext(
        attempts=0,
        received_at=received.at,
        received_monotonic=12.5,
        redeliveries=int(redelivered),
        body_bytes=2,
    )
    believed = {
        Header.ATTEMPTS: 2,
        Header.SETTLE_SEQ: 3,
        Header.REDELIVERIES: 1,
        Header.FIRST_FAILURE_AT: "2026-12-01T10:00:00+00:00",
        Header.ERROR_CODE: "http_503",
        Header.ERROR_MESSAGE: "unavailable",
    }
    later = delivery_context(message, believed, received)
    assert (later.attempts, later.settle_seq, later.redeliveries) == (2, 3, 1 + int(redelivered))
    assert later.first_failure_at == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert later.last_error is not None
    assert later.last_error.code == "http_503"

"""The context budget: token estimate, room for the answer, and which evidence goes first when an incident is big."""

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import IncidentContext, Pricing
from tests import fixtures
from worker.handling.cost import priced_usage
from worker.prompting import budget, evidence


def _at(minute: int) -> str:
    return f"2026-11-20T{14 + minute // 60}:{minute % 60:02d}:00Z"


def small_incident() -> dict[str, Any]:
    """Two of everything, with an old ERROR line and a newer INFO line to show level beats age."""
    return {
        "title": "orders-db failover",
        "severity": "sev2",
        "service": "orders",
        "summary": "Primary lost; replica promoted.",
        "timeline": [{"at": _at(m), "event": f"step {m}"} for m in range(8)],
        "alerts": [{"name": "DbDown", "severity": "critical"}],
        "logs": [
            {"at": _at(1), "level": "ERROR", "message": "connection refused " + "x" * 600},
            {"at": _at(2), "level": "INFO", "message": "health check ok " + "y" * 600},
            {"at": _at(3), "level": "WARN", "message": "replica lag 30s " + "z" * 600},
        ],
        "metrics": [{"name": "lag", "points": [{"at": _at(m), "value": m} for m in range(60)]}],
        "deploys": [
            {"service": "orders", "version": "v1", "at": _at(0)},
            {"service": "orders", "version": "v2", "at": _at(5)},
        ],
        "metadata": {"region": "eu-west-1"},
    }


def fitted(data: dict[str, Any], tokens: int) -> tuple[evidence.IncidentView, str]:
    view = budget.fit(IncidentContext.model_validate(data), tokens)
    return view, evidence.render(view)


def whole_tokens(data: dict[str, Any]) -> int:
    return budget.estimate_tokens(evidence.render(evidence.IncidentView.whole(IncidentContext.model_validate(data))))


def test_tokens_are_estimated_as_utf8_bytes_over_three_rounded_up() -> None:
    assert budget.estimate_tokens("") == 0
    assert budget.estimate_tokens("abc") == 1
    assert budget.estimate_tokens("abcd") == 2
    assert budget.estimate_tokens("日本") == 2  # 3 bytes each


def test_unknown_window_defaults_to_32k_and_rca_reserves_room_for_a_repair() -> None:
    summary = budget.plan(None, 512)
    rca = budget.plan(None, 2048, answers=2)

    assert summary.context_window == 32768
    assert summary.prompt_tokens == 32768 - 512 - 1639  # 5% margin, rounded up
    assert rca.prompt_tokens == 32768 - 2 * 2048 - 1639
    assert budget.plan(8192, 60_000).max_output_tokens == 2048  # the prompt keeps at least 3/4


def test_overflow_budget_fits_the_reported_window_or_halves() -> None:
    first = budget.plan(32768, 1024)

    reported = budget.tighter(first, "400: This model's maximum context length is 16384 tokens. However, you ...")
    unknown = budget.tighter(first, "400: prompt too long")
    larger = budget.tighter(first, "maximum context length is 65536 tokens")

    assert reported.context_window == 16384
    assert reported.prompt_tokens == 16384 - 1024 - 820
    assert unknown.prompt_tokens == larger.prompt_tokens == first.prompt_tokens // 2


def test_an_incident_that_fits_is_shown_whole() -> None:
    view, text = fitted(small_incident(), 10_000)

    assert view.trimmed == {}
    assert "Note:" not in text
    assert "[log 0]" in text
    assert "[log 2]" in text
    assert "[metric 0]" in text


def test_quiet_log_lines_go_first_even_when_newer_than_errors() -> None:
    data = small_incident()
    view, text = fitted(data, whole_tokens(data) - 60)

    assert view.trimmed == {"logs": 1}
    assert "[log 1]" not in text
    assert "[log 0]" in text
    assert "[log 2]" in text
    assert "some evidence was left out (logs 1)" in text


def test_logs_go_before_metric_points_and_points_go_oldest_first() -> None:
    data = small_incident()
    view, text = fitted(data, whole_tokens(data) - 150)

    assert view.trimmed.keys() == {"logs", "metric_points"}
    assert view.trimmed["logs"] == 1  # the quiet line; the two loud ones are under the floor of the first pass
    shown = [_at(m) for m in range(60) if f" {_at(m)}=" in text]
    assert shown == [_at(m) for m in range(view.trimmed["metric_points"], 60)]


def test_never_trims_title_alerts_timeline_head_or_newest_deploy() -> None:
    data = small_incident()
    view, text = fitted(data, 1)

    for kept in ("Incident: orders-db failover", "Severity: sev2", "[alert 0] DbDown", "[deploy 1]"):
        assert kept in text
    assert [f"[timeline {i}]" in text for i in range(8)] == [True] * 5 + [False] * 3
    assert "[deploy 0]" not in text
    assert "[log" not in text
    assert "[metric" not in text
    assert "Summary:" not in text
    assert view.trimmed == {
        "logs": 3,
        "metric_points": 59,
        "timeline": 3,
        "metadata": 1,
        "deploys": 1,
        "metrics": 1,
        "summary_chars": len(data["summary"]),
    }


def test_trimmed_report_matches_what_is_missing_from_the_big_incident() -> None:
    data = fixtures.big_incident()
    view, text = fitted(data, 20_000)

    assert budget.estimate_tokens(text) <= 20_000
    assert set(view.trimmed) == {"logs", "metric_points"}
    assert len(re.findall(r"^\[log \d+\]", text, re.MULTILINE)) == len(data["logs"]) - view.trimmed["logs"]
    points = sum(len(s["points"]) for s in data["metrics"])
    assert len(re.findall(r" \S+Z=", text)) == points - view.trimmed["metric_points"]
    assert all(f"[alert {i}]" in text for i in range(len(data["alerts"])))
    assert all(f"[metric {i}]" in text for i in range(len(data["metrics"])))


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(min_value=0, max_value=4000))
def test_any_budget_fits_unless_only_untrimmable_parts_are_left(tokens: int) -> None:
    data = small_incident()
    view, text = fitted(data, tokens)

    if budget.estimate_tokens(text) > tokens:  # then everything trimmable is gone
        assert view.trimmed.get("summary_chars") == len(data["summary"])
    citable = view.citable()
    assert citable["alert"] == {0}
    assert {0, 1, 2, 3, 4} <= citable["timeline"]
    assert all(f"[log {i}]" in text for i in citable["log"])


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(min_value=0, max_value=4000))
def test_the_prompt_text_is_the_rendering_of_the_view_it_reports(tokens: int) -> None:
    incident = IncidentContext.model_validate(small_incident())

    view, text = budget.fit_and_render(incident, tokens)

    assert text == evidence.render(view)


def test_cost_is_tokens_times_the_price_per_thousand() -> None:
    pricing = Pricing(currency="USD", input_per_1k_tokens=0.0025, output_per_1k_tokens=0.01)

    usage = priced_usage(1234, 567, pricing)

    assert usage.estimated_cost == 0.008755  # 1234 * 0.0025 / 1000 + 567 * 0.01 / 1000, exactly
    assert usage.currency == "USD"
    assert priced_usage(1234, 567, None).estimated_cost is None
    assert priced_usage(0, 0, pricing).estimated_cost == 0.0

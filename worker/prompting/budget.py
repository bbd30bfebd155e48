"""The context budget: estimate tokens, reserve room for the answer, and trim the least valuable evidence first.

Tokens are estimated as UTF-8 bytes / 3, rounded up. Real tokenizers average about 4 characters per token on
English prose and 2.5-3.5 on logs full of timestamps, ids and hex, so 3 bytes errs on the side of "too big";
CJK text is about one token per character, which is 3 bytes in UTF-8. No tokenizer is downloaded or run.

Trimming order, least valuable first; each step runs to its end before the next begins, and trimming stops as
soon as the text fits. A first pass keeps a floor of the most recent evidence of every kind, a second goes below:

1. `logs`: DEBUG/TRACE/INFO/NOTICE lines, oldest first
2. `logs`: all other lines, oldest first, down to the newest 40
3. `metric_points`: samples, oldest first across all series, down to the newest 12 of each series
4. `timeline`: entries after the head (the first 5), oldest first, down to the newest 5
5. `metadata`: incident labels, in reverse key order
6. `deploys`: oldest first, down to the newest 3
7. `logs`: the remaining lines, oldest first
8. `metric_points`: the remaining samples, oldest first; every series keeps its newest one
9. `timeline`: the remaining entries after the head, oldest first
10. `deploys`: the remaining ones but the newest, oldest first
11. `metrics`: whole series (each down to its newest sample by now), last listed first
12. `summary_chars`: the free-text summary is cut short, from its end

Never trimmed: the title, severity, service, start time, the alerts, the head of the timeline and the newest
deploy. If those alone do not fit, the prompt is sent anyway (the estimate is pessimistic) and a provider's
context-overflow answer decides.
"""

import math
import re
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from contracts import IncidentContext
from worker.prompting import evidence
from worker.prompting.evidence import IncidentView

BYTES_PER_TOKEN = 3
DEFAULT_CONTEXT_WINDOW = 32_768  # the product's minimum; a tenant sets `provider.context_window` when it knows
SAFETY_MARGIN = 0.05  # of the window, for the estimate's error and the provider's chat-template tokens
MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators per message
TIMELINE_HEAD = 5
# The first pass keeps this much recent evidence; only the second pass trims below it.
LOG_FLOOR = 40  # newest WARN/ERROR/other lines
POINT_FLOOR = 12  # newest samples per series
TIMELINE_TAIL_FLOOR = 5  # newest entries after the head
DEPLOY_FLOOR = 3  # newest deploys
QUIET_LOG_LEVELS = frozenset({"trace", "debug", "info", "notice"})
NOTE_RESERVE_BYTES = 400  # the "some evidence was left out" note added once anything is trimmed
REPORTED_WINDOW = re.compile(
    r"maximum context length is (\d+)|maximum model length of (\d+)|must be <= (\d+)|context window of (\d+)",
    re.IGNORECASE,
)
_OLDEST = datetime.min.replace(tzinfo=UTC)


def estimate_tokens(text: str) -> int:
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class Budget:
    """How a model's context window is shared between the prompt and the answer."""

    context_window: int
    max_output_tokens: int
    prompt_tokens: int  # everything sent: system prompt, tools or schema, turns
    answers: int = 1


def plan(context_window: int | None, output_tokens: int, *, answers: int = 1) -> Budget:
    """Reserve room for `answers` answers: RCA keeps room to send its first answer back for one repair."""
    window = context_window or DEFAULT_CONTEXT_WINDOW
    output = max(1, min(output_tokens, window // 4))  # a prompt always keeps most of the window
    margin = math.ceil(window * SAFETY_MARGIN)
    return Budget(window, output, window - output * answers - margin, answers)


def tighter(budget: Budget, provider_message: str) -> Budget:
    """The budget for the one retry after a context overflow.

    When the provider names a window smaller than ours, plan for that window (and at most 3/4 of the first
    prompt budget); otherwise our estimate undercounted, so halve the prompt budget.
    """
    reported = _reported_window(provider_message)
    if reported is not None and reported < budget.context_window:
        fitted = plan(reported, budget.max_output_tokens, answers=budget.answers)
        return replace(fitted, prompt_tokens=max(0, min(fitted.prompt_tokens, budget.prompt_tokens * 3 // 4)))
    return replace(budget, prompt_tokens=budget.prompt_tokens // 2)


def _reported_window(message: str) -> int | None:
    match = REPORTED_WINDOW.search(message)
    if match is None:
        return None
    return int(next(group for group in match.groups() if group is not None))


@dataclass(frozen=True, slots=True)
class _Cut:
    stage: str
    key: Hashable
    saves: int  # bytes the rendered text loses, at least


def fit(incident: IncidentContext, max_tokens: int) -> IncidentView:
    """The largest view of the incident, trimmed in the documented order, whose text fits `max_tokens`."""
    return fit_and_render(incident, max_tokens)[0]


def fit_and_render(incident: IncidentContext, max_tokens: int) -> tuple[IncidentView, str]:
    """`fit`, with the view's text: the usual case (it fits whole) renders the incident once, not twice."""
    whole = IncidentView.whole(incident)
    lines = evidence.render_lines(whole)
    text = "\n".join(lines)
    size = len(text.encode())
    limit = max_tokens * BYTES_PER_TOKEN
    if size <= limit:
        return whole, text
    # Each log line is formatted once: what cutting it saves and the trimmed text reuse the whole text's lines.
    log_texts = lines[len(lines) - len(incident.logs) :] if incident.logs else []
    limit -= NOTE_RESERVE_BYTES
    dropped: dict[str, set[Hashable]] = {}
    summary_cut = 0
    for cut in _cuts(incident, log_texts):
        dropped.setdefault(cut.stage, set()).add(cut.key)
        size -= cut.saves
        if size <= limit:
            break
    else:
        summary_cut = _summary_cut(incident.summary, size - limit + len("…".encode()))
    view = _view(incident, dropped, summary_cut)
    return view, evidence.render(view, log_texts)


def _cuts(incident: IncidentContext, log_texts: Sequence[str]) -> Iterator[_Cut]:
    quiet, loud = _logs_oldest_first(incident)
    older_points, recent_points = _points_oldest_first(incident)
    middle = list(range(TIMELINE_HEAD, len(incident.timeline)))
    deploys = _deploys_oldest_first(incident)
    # First pass: keep a floor of the most recent evidence of each kind.
    yield from _log_cuts(log_texts, quiet)
    yield from _log_cuts(log_texts, loud[:-LOG_FLOOR])
    yield from _point_cuts(incident, older_points)
    yield from _timeline_cuts(incident, middle[:-TIMELINE_TAIL_FLOOR])
    yield from _metadata_cuts(incident)
    yield from _deploy_cuts(incident, deploys[:-DEPLOY_FLOOR])
    # Second pass: down to the parts that are never trimmed.
    yield from _log_cuts(log_texts, loud[-LOG_FLOOR:])
    yield from _point_cuts(incident, recent_points)
    yield from _timeline_cuts(incident, middle[-TIMELINE_TAIL_FLOOR:])
    yield from _deploy_cuts(incident, deploys[-DEPLOY_FLOOR:-1])
    yield from _metric_series_cuts(incident)


def _when(at: datetime | None) -> datetime:
    if at is None:
        return _OLDEST
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _line_cost(line: str) -> int:
    return len(line.encode()) + 1  # and its newline


def _logs_oldest_first(incident: IncidentContext) -> tuple[list[int], list[int]]:
    logs = incident.logs
    order = sorted(range(len(logs)), key=lambda i: (_when(logs[i].at), i))
    is_quiet = [(logs[i].level or "").lower() in QUIET_LOG_LEVELS for i in range(len(logs))]
    return [i for i in order if is_quiet[i]], [i for i in order if not is_quiet[i]]


def _points_oldest_first(incident: IncidentContext) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every sample but each series' newest, oldest first: those beyond the floor, then the floor."""
    older: list[tuple[datetime, int, int]] = []
    recent: list[tuple[datetime, int, int]] = []
    for s, series in enumerate(incident.metrics):
        by_age = sorted(range(len(series.points)), key=lambda p: (_when(series.points[p].at), p))[:-1]
        older += [(_when(series.points[p].at), s, p) for p in by_age[: max(0, len(by_age) - POINT_FLOOR + 1)]]
        recent += [(_when(series.points[p].at), s, p) for p in by_age[max(0, len(by_age) - POINT_FLOOR + 1) :]]
    return [(s, p) for _, s, p in sorted(older)], [(s, p) for _, s, p in sorted(recent)]


def _deploys_oldest_first(incident: IncidentContext) -> list[int]:
    deploys = incident.deploys
    return sorted(range(len(deploys)), key=lambda i: (_when(deploys[i].at), i))


def _log_cuts(log_texts: Sequence[str], order: list[int]) -> Iterator[_Cut]:
    for i in order:
        yield _Cut("logs", i, _line_cost(log_texts[i]))


def _point_cuts(incident: IncidentContext, order: list[tuple[int, int]]) -> Iterator[_Cut]:
    for s, p in order:
        yield _Cut("metric_points", (s, p), len(evidence.point_text(incident.metrics[s].points[p]).encode()))


def _timeline_cuts(incident: IncidentContext, order: list[int]) -> Iterator[_Cut]:
    for i in order:
        yield _Cut("timeline", i, _line_cost(evidence.timeline_line(i, incident.timeline[i])))


def _metadata_cuts(incident: IncidentContext) -> Iterator[_Cut]:
    for key in sorted(incident.metadata, reverse=True):
        yield _Cut("metadata", key, len(evidence.metadata_item(key, incident.metadata[key]).encode()) + 2)


def _deploy_cuts(incident: IncidentContext, order: list[int]) -> Iterator[_Cut]:
    for i in order:
        yield _Cut("deploys", i, _line_cost(evidence.deploy_line(i, incident.deploys[i])))


def _metric_series_cuts(incident: IncidentContext) -> Iterator[_Cut]:
    # By now each series shows only its newest sample, so that is what dropping the series saves.
    for s in reversed(range(len(incident.metrics))):
        series = incident.metrics[s]
        newest = max(series.points, key=lambda p: _when(p.at), default=None)
        line = evidence.metric_head(s, series) + (evidence.point_text(newest) if newest else "")
        yield _Cut("metrics", s, _line_cost(line))


def _summary_cut(summary: str | None, excess_bytes: int) -> int:
    """How many characters to cut from the end of the summary (all of it if that is still not enough)."""
    if not summary or excess_bytes <= 0:
        return 0
    cut, saved = 0, 0
    for char in reversed(summary):
        if saved >= excess_bytes:
            break
        saved += len(char.encode())
        cut += 1
    return cut


def _view(incident: IncidentContext, dropped: dict[str, set[Hashable]], summary_cut: int) -> IncidentView:
    def kept(stage: str, count: int) -> tuple[int, ...]:
        return tuple(i for i in range(count) if i not in dropped.get(stage, set()))

    points = dropped.get("metric_points", set())
    metrics = tuple(
        (s, tuple(p for p in range(len(series.points)) if (s, p) not in points))
        for s, series in enumerate(incident.metrics)
        if s not in dropped.get("metrics", set())
    )
    summary = incident.summary
    if summary is not None and summary_cut:
        summary = summary[: len(summary) - summary_cut] + "…" if summary_cut < len(summary) else None
    trimmed = {stage: len(keys) for stage, keys in dropped.items() if keys}
    if summary_cut:
        trimmed["summary_chars"] = summary_cut
    return IncidentView(
        incident=incident,
        timeline=kept("timeline", len(incident.timeline)),
        logs=kept("logs", len(incident.logs)),
        deploys=kept("deploys", len(incident.deploys)),
        metrics=metrics,
        metadata=tuple(k for k in sorted(incident.metadata) if k not in dropped.get("metadata", set())),
        summary=summary,
        trimmed=trimmed,
    )

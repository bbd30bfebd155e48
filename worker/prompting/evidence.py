"""The incident as the model reads it: every item tagged `[kind index]` with its position in the request.

An `IncidentView` says which items are shown. Positions are always those of the request, so a citation such as
`[log 812]` still points at the right line after older lines were left out to fit the context window. This
text is part of every incident prompt: changing its format means bumping the versions in `worker.prompting.prompts`.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from contracts import Alert, Deploy, IncidentContext, LogLine, MetricPoint, MetricSeries, TimelineEvent


@dataclass(frozen=True, slots=True)
class IncidentView:
    """Which items of an incident are shown; what was left out is counted in `trimmed`."""

    incident: IncidentContext
    timeline: tuple[int, ...]
    logs: tuple[int, ...]
    deploys: tuple[int, ...]
    metrics: tuple[tuple[int, tuple[int, ...]], ...]  # (series position, positions of the points shown)
    metadata: tuple[str, ...]
    summary: str | None
    trimmed: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def whole(cls, incident: IncidentContext) -> "IncidentView":
        return cls(
            incident=incident,
            timeline=tuple(range(len(incident.timeline))),
            logs=tuple(range(len(incident.logs))),
            deploys=tuple(range(len(incident.deploys))),
            metrics=tuple((i, tuple(range(len(m.points)))) for i, m in enumerate(incident.metrics)),
            metadata=tuple(sorted(incident.metadata)),
            summary=incident.summary,
        )

    def citable(self) -> dict[str, frozenset[int]]:
        """Positions the model saw, per evidence kind: the only ones an answer may cite."""
        return {
            "timeline": frozenset(self.timeline),
            "alert": frozenset(range(len(self.incident.alerts))),
            "log": frozenset(self.logs),
            "metric": frozenset(i for i, _ in self.metrics),
            "deploy": frozenset(self.deploys),
        }


def iso(at: datetime) -> str:
    """UTC, to the second (milliseconds when present), with `Z`: short, and sorts as text."""
    if at.tzinfo is not None and (offset := at.utcoffset()):
        at = at - offset
    # Formatted by hand: every timestamp of every prompt passes here, and `replace`/`isoformat` on a
    # pydantic-parsed datetime call back into Python for its tzinfo, several times slower.
    text = "%04d-%02d-%02dT%02d:%02d:%02d" % (at.year, at.month, at.day, at.hour, at.minute, at.second)  # noqa: UP031
    return "%s.%03dZ" % (text, at.microsecond // 1000) if at.microsecond else text + "Z"  # noqa: UP031


def _when(at: datetime | None) -> str:
    return iso(at) if at is not None else "-"


def _one_line(text: str) -> str:
    # Indent continuation lines so text inside an item can never look like a new `[kind index]` tag.
    return text.replace("\r", "").replace("\n", "\n    ")


def timeline_line(i: int, event: TimelineEvent) -> str:
    source = f" ({event.source})" if event.source else ""
    return f"[timeline {i}] {_when(event.at)}{source} {_one_line(event.event)}"


def alert_line(i: int, alert: Alert) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
    parts = [f"[alert {i}] {alert.name}", f"severity={alert.severity or '-'}", f"fired={_when(alert.fired_at)}"]
    if labels:
        parts.append(labels)
    if alert.summary:
        parts.append(_one_line(alert.summary))
    return " ".join(parts)


def deploy_line(i: int, deploy: Deploy) -> str:
    author = f" by {deploy.author}" if deploy.author else ""
    description = f": {_one_line(deploy.description)}" if deploy.description else ""
    return f"[deploy {i}] {_when(deploy.at)} {deploy.service} {deploy.version}{author}{description}"


def metric_head(i: int, series: MetricSeries) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(series.labels.items()))
    return f"[metric {i}] {series.name}{{{labels}}} ({series.unit or '-'}):"


def point_text(point: MetricPoint) -> str:
    """One sample, with a leading space: a series line is its head followed by these."""
    return f" {iso(point.at)}={point.value:g}"


def log_line(i: int, line: LogLine) -> str:
    return f"[log {i}] {_when(line.at)} {line.level or '-'} {line.service or '-'} {_one_line(line.message)}"


def metadata_item(key: str, value: str) -> str:
    return f"{key}={value}"


def header_lines(view: IncidentView) -> list[str]:
    incident = view.incident
    lines = [f"Incident: {incident.title}", f"Severity: {incident.severity}"]
    if incident.service:
        lines.append(f"Service: {incident.service}")
    if incident.started_at:
        lines.append(f"Started: {iso(incident.started_at)}")
    if view.metadata:
        lines.append("Labels: " + ", ".join(metadata_item(k, incident.metadata[k]) for k in view.metadata))
    if view.summary:
        lines.append(f"Summary: {_one_line(view.summary)}")
    if view.trimmed:
        left_out = ", ".join(f"{kind} {count}" for kind, count in view.trimmed.items())
        lines.append(
            f"Note: to fit the model's context window some evidence was left out ({left_out}); "
            "the items shown keep their original positions."
        )
    return lines


def render(view: IncidentView, log_texts: Sequence[str] | None = None) -> str:
    """The incident context as plain text, in a fixed order: header, timeline, alerts, deploys, metrics, logs.
    `log_texts` are the log lines already formatted (`log_line` of every log, in order), to reuse."""
    return "\n".join(render_lines(view, log_texts))


def render_lines(view: IncidentView, log_texts: Sequence[str] | None = None) -> list[str]:
    """`render`'s lines, which end with the shown logs' lines: a whole view's last `len(logs)` are `log_texts`."""
    incident = view.incident
    lines = header_lines(view)
    if view.timeline:
        lines.append("\nTimeline:")
        lines += [timeline_line(i, incident.timeline[i]) for i in view.timeline]
    if incident.alerts:
        lines.append("\nAlerts:")
        lines += [alert_line(i, alert) for i, alert in enumerate(incident.alerts)]
    if view.deploys:
        lines.append("\nRecent deploys:")
        lines += [deploy_line(i, incident.deploys[i]) for i in view.deploys]
    if view.metrics:
        lines.append("\nMetrics:")
        for i, points in view.metrics:
            series = incident.metrics[i]
            lines.append(metric_head(i, series) + "".join(point_text(series.points[p]) for p in points))
    if view.logs:
        lines.append("\nLogs:")
        if log_texts is None:
            lines += [log_line(i, incident.logs[i]) for i in view.logs]
        else:
            lines += [log_texts[i] for i in view.logs]
    return lines

"""The incident context a publisher sends: what happened, what fired, what the logs and metrics say."""

from datetime import datetime

from pydantic import Field

from ._base import Contract

# Every collection stops at its first invalid item (`fail_fast`): an error per item would let a body of 100,000
# broken entries cost the worker's event loop a quarter of a second to describe.


class TimelineEvent(Contract):
    """One entry of the incident timeline, oldest first."""

    at: datetime
    event: str = Field(max_length=4000)
    source: str | None = None


class Alert(Contract):
    """An alert that fired for the incident."""

    name: str = Field(max_length=500)
    severity: str | None = None
    fired_at: datetime | None = None
    summary: str | None = Field(default=None, max_length=4000)
    labels: dict[str, str] = Field(default_factory=dict, fail_fast=True)


class LogLine(Contract):
    """One log line from an affected service."""

    at: datetime | None = None
    level: str | None = None
    service: str | None = None
    message: str = Field(max_length=20000)


class MetricPoint(Contract):
    """One sample of a metric series."""

    at: datetime
    value: float


class MetricSeries(Contract):
    """A metric the publisher thinks is relevant, with its recent samples, oldest first."""

    name: str = Field(max_length=500)
    unit: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, fail_fast=True)
    points: list[MetricPoint] = Field(default_factory=list, fail_fast=True)


class Deploy(Contract):
    """A recent change to an affected service."""

    service: str
    version: str
    at: datetime
    author: str | None = None
    description: str | None = Field(default=None, max_length=4000)


class IncidentContext(Contract):
    """Everything the worker may show the model about one incident."""

    incident_id: str | None = None
    title: str = Field(min_length=1, max_length=1000)
    severity: str = Field(min_length=1, max_length=50, examples=["sev1", "critical"])
    service: str | None = None
    summary: str | None = Field(default=None, max_length=20000)
    started_at: datetime | None = None
    timeline: list[TimelineEvent] = Field(default_factory=list, fail_fast=True)
    alerts: list[Alert] = Field(default_factory=list, fail_fast=True)
    logs: list[LogLine] = Field(default_factory=list, fail_fast=True)
    metrics: list[MetricSeries] = Field(default_factory=list, fail_fast=True)
    deploys: list[Deploy] = Field(default_factory=list, fail_fast=True)
    metadata: dict[str, str] = Field(default_factory=dict, fail_fast=True)

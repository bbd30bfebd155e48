"""The structured result of an `rca` task: causes with confidence, each pointing at the evidence it rests on."""

from typing import Literal

from pydantic import Field

from ._base import Contract

EvidenceKind = Literal["timeline", "alert", "log", "metric", "deploy"]


class EvidenceRef(Contract):
    """Points at one item of the incident context by its list and position (0-based)."""

    kind: EvidenceKind
    index: int = Field(ge=0)
    note: str = Field(max_length=2000)


class ProbableCause(Contract):
    """One hypothesis for the root cause."""

    title: str = Field(min_length=1, max_length=500)
    description: str = Field(max_length=8000)
    confidence: float = Field(ge=0.0, le=1.0)
    evidence: list[EvidenceRef]


class RemediationStep(Contract):
    """One thing to do, in order."""

    action: str = Field(min_length=1, max_length=2000)
    rationale: str = Field(max_length=4000)
    risk: Literal["low", "medium", "high"]


class RcaResult(Contract):
    """Root-cause analysis of one incident."""

    summary: str = Field(min_length=1, max_length=8000)
    probable_causes: list[ProbableCause] = Field(min_length=1)
    impact: str = Field(max_length=8000)
    remediation: list[RemediationStep]
    follow_ups: list[str]

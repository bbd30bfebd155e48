"""The structured result of an `rca` task: causes with confidence, each pointing at the evidence it rests on."""

from typing import Annotated, Literal

from pydantic import Field

from ._base import Contract

EvidenceKind = Literal["timeline", "alert", "log", "metric", "deploy"]
Text = Annotated[str, Field(max_length=2000)]


class EvidenceRef(Contract):
    """Points at one item of the incident context by its list and its position in the request (0-based)."""

    kind: EvidenceKind = Field(description="Which list of the incident context the item is in.")
    index: int = Field(
        ge=0, description="0-based position of the item in that list, as shown in brackets, e.g. [log 12]."
    )
    note: str = Field(max_length=2000, description="What this item shows, in one sentence.")


class ProbableCause(Contract):
    """One hypothesis for the root cause."""

    title: str = Field(min_length=1, max_length=500, description="The cause in a few words.")
    description: str = Field(max_length=8000, description="How this cause explains what was observed.")
    confidence: float = Field(ge=0.0, le=1.0, description="Between 0 and 1.")
    evidence: list[EvidenceRef] = Field(
        max_length=50, description="Items of the incident context this cause rests on; may be empty."
    )


class RemediationStep(Contract):
    """One thing to do, in order."""

    action: str = Field(min_length=1, max_length=2000, description="What to do, imperative.")
    rationale: str = Field(max_length=4000, description="Why this step helps.")
    risk: Literal["low", "medium", "high"] = Field(description="Risk of taking the step in production.")


class RcaResult(Contract):
    """Root-cause analysis of one incident."""

    summary: str = Field(min_length=1, max_length=8000, description="Two or three sentences on what happened and why.")
    probable_causes: list[ProbableCause] = Field(
        min_length=1, max_length=10, description="Between 1 and 10 hypotheses, most likely first."
    )
    impact: str = Field(max_length=8000, description="Who and what is affected, and how badly.")
    remediation: list[RemediationStep] = Field(max_length=20, description="Steps in the order to take them.")
    follow_ups: list[Text] = Field(max_length=20, description="Work to prevent a recurrence, after the incident.")

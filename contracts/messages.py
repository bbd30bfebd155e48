"""Inference requests and replies as they travel over RabbitMQ (JSON, `application/json`)."""

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from ._base import TENANT_ID_PATTERN as TENANT_ID_PATTERN
from ._base import Contract
from .incident import IncidentContext
from .rca import RcaResult
from .tenant import ProviderSettings

SCHEMA_VERSION = 1
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class Task(StrEnum):
    """What the publisher wants done with the incident."""

    RCA = "rca"
    RUNBOOK = "runbook"
    SUMMARY = "summary"
    CHAT = "chat"
    TEST_CONNECTION = "test_connection"


class Status(StrEnum):
    """How a request ended."""

    OK = "ok"
    FAILED = "failed"  # the provider or the model could not produce a valid answer
    UNAVAILABLE = "unavailable"  # the tenant's provider is down and its policy is fail_closed
    EXPIRED = "expired"  # the request's deadline passed before it could be answered
    REJECTED = "rejected"  # the request itself was malformed


class ChatMessage(Contract):
    """A conversation turn supplied by the caller (`chat` task)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)
    tool_call_id: str | None = None


class ToolDeclaration(Contract):
    """An automation action the platform can run; its parameters are a JSON Schema object."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str = Field(default="", max_length=4000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolCall(Contract):
    """A call the model asked for, with arguments already parsed from JSON."""

    id: str | None = None
    name: str
    arguments: dict[str, Any]


class InferenceRequest(Contract):
    """What upstream services publish to `{ns}.requests`."""

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    request_id: str = Field(min_length=1, max_length=200, description="Idempotency key.")
    tenant_id: str = Field(pattern=TENANT_ID_PATTERN)
    task: Task
    incident: IncidentContext | None = None
    deadline: datetime | None = Field(
        default=None, description="Absolute time (ISO 8601 with offset) after which no answer is useful."
    )
    tools: list[ToolDeclaration] | None = Field(default=None, max_length=128, fail_fast=True)
    max_output_tokens: int | None = Field(default=None, ge=1, le=65_536)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    messages: list[ChatMessage] | None = Field(default=None, max_length=500, fail_fast=True)
    provider: ProviderSettings | None = Field(
        default=None,
        description=(
            "`test_connection` only: a provider configuration not yet saved, tested instead of the tenant's "
            "stored one. Secrets must be literal values here; `env:`/`file:` references are refused."
        ),
    )

    @model_validator(mode="after")
    def _task_has_its_input(self) -> "InferenceRequest":
        if self.task in (Task.RCA, Task.RUNBOOK, Task.SUMMARY) and self.incident is None:
            raise ValueError(f"task {self.task.value!r} needs an 'incident'")
        if self.task is Task.CHAT and not self.messages:
            raise ValueError("task 'chat' needs a non-empty 'messages' list")
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise ValueError("'deadline' needs a UTC offset, e.g. 2026-01-01T12:00:00Z")
        return self


class Usage(Contract):
    """Tokens the tenant's provider counted, and what they cost if the tenant has a price table."""

    input_tokens: int = 0
    output_tokens: int = 0
    estimated_cost: float | None = None
    currency: str | None = None


HISTORY_ENTRIES = 10
StoppedBecause = Literal["attempts_exhausted", "deadline", "circuit_open"]


class AttemptRecord(Contract):
    """One failed try in a request's history: what happened, and when the next try was due."""

    at: datetime
    error_class: str | None = None
    code: str
    provider_called: bool = Field(description="False when an open circuit refused the call before it was sent.")
    level: int | None = Field(default=None, description="The retry-ladder level the request was parked on.")
    next_attempt_at: datetime | None = Field(default=None, description="When the request was due back.")


class Provenance(Contract):
    """Where the answer came from and what the worker did to get it."""

    provider_kind: str | None = None
    model: str | None = None
    attempts: int = 0
    policy: str | None = Field(default=None, description="The tenant's fallback policy, when one applied.")
    fallback_used: bool = False
    data_left_network: bool = False
    prompt_version: str | None = None
    trimmed: dict[str, int] = Field(
        default_factory=dict, description="Items of the incident context left out to fit the model."
    )
    model_calls: int = Field(
        default=0, description="Provider calls behind this reply: 1, or 2 after a repair or a context-overflow retry."
    )
    repaired: bool = Field(default=False, description="The result came from the one repair attempt.")
    context_window: int | None = Field(default=None, description="The model's context window the prompt was fit to.")
    prompt_budget_tokens: int | None = Field(
        default=None, description="Estimated tokens the prompt was allowed, after reserving room for the answer."
    )
    settle_seq: int = Field(
        default=0,
        description="Times the request was put back on the retry ladder before this reply. Of two replies to "
        "one request, the one with the higher settle_seq is authoritative.",
    )
    redeliveries: int = Field(
        default=0,
        description="Broker redeliveries in this reply's history; breaks a settle_seq tie (fewer wins).",
    )
    history: list[AttemptRecord] = Field(
        default_factory=list,
        max_length=HISTORY_ENTRIES,
        description=f"The request's failed tries, oldest first: at most the last {HISTORY_ENTRIES}.",
    )


class Timings(Contract):
    """Milliseconds spent, measured by the worker."""

    received_at: datetime
    replied_at: datetime
    provider_ms: float = 0.0
    total_ms: float = 0.0


class LastProviderError(Contract):
    """The last error the tenant's provider itself returned for this request."""

    code: str
    message: str
    error_class: str | None = None


class ErrorInfo(Contract):
    """Why a request did not end `ok`. Never holds secrets."""

    code: str
    message: str
    error_class: str | None = None
    retry_after_s: float | None = None
    last_provider_error: LastProviderError | None = Field(
        default=None,
        description="When the request ended without calling the provider, the provider's last real error "
        "for it, if an earlier attempt met one (`code` then repeats it).",
    )
    stopped_because: StoppedBecause | None = Field(
        default=None,
        description="Why retrying stopped: `attempts_exhausted`, `deadline` (the next try would miss it), or "
        "`circuit_open` (the circuit stayed open past the time the request's attempts could take).",
    )


ToolCallingSupport = Literal["yes", "no", "forced_only", "unknown"]
StructuredOutputSupport = Literal["schema", "json_mode", "none", "unknown"]
ContextWindowSource = Literal["config", "provider", "model_table"]
CheckStatus = Literal["pass", "warn", "fail"]
Verdict = Literal["ready", "ready_with_warnings", "not_ready"]


class RequirementCheck(Contract):
    """One of the product's model requirements, judged against what the probes observed."""

    requirement: Literal["secrets", "connection", "tool_calling", "context_window", "structured_output", "rca_latency"]
    status: CheckStatus
    message: str
    fix: str | None = Field(default=None, description="What the tenant admin should change, when not `pass`.")


class ConnectionReport(Contract):
    """What Test Connection found out about a provider configuration. Never holds secrets."""

    provider_kind: str
    endpoint: str
    model: str
    reachable: bool
    authenticated: bool | None = None
    model_found: bool | None = None
    latency_ms: float | None = Field(default=None, description="Round trip of the smallest possible call.")
    served_model: str | None = Field(default=None, description="The model name the provider reported, if any.")
    tool_calling: ToolCallingSupport = "unknown"
    structured_output: StructuredOutputSupport = "unknown"
    context_window: int | None = None
    context_window_source: ContextWindowSource | None = None
    rca_latency_ms: float | None = Field(default=None, description="A typical RCA call on a small sample incident.")
    input_tokens: int = 0
    output_tokens: int = 0
    verdict: Verdict
    checks: list[RequirementCheck] = Field(default_factory=list)


class ReplyResult(Contract):
    """The answer, in the shape of its task."""

    text: str | None = None
    rca: RcaResult | None = None
    tool_calls: list[ToolCall] | None = None
    raw_output: str | None = Field(
        default=None, description="The model's unusable output, kept for diagnosis on `invalid_output`."
    )
    connection: ConnectionReport | None = Field(default=None, description="The `test_connection` report.")


class InferenceReply(Contract):
    """What the worker publishes to `reply_to`, or to `{ns}.replies` with key `<tenant_id>.<task>`."""

    schema_version: int = SCHEMA_VERSION
    request_id: str | None
    tenant_id: str | None
    task: str | None
    status: Status
    result: ReplyResult | None = None
    usage: Usage = Field(default_factory=Usage)
    provenance: Provenance = Field(default_factory=Provenance)
    timings: Timings
    error: ErrorInfo | None = None

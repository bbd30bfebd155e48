"""The provider protocol: one neutral model call in, one neutral result out."""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from contracts import ToolCall

Role = Literal["user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class Turn:
    """One conversation turn (the system prompt travels separately)."""

    role: Role
    content: str
    tool_call_id: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutputSchema:
    """Ask the provider for JSON matching this schema, by its best mechanism."""

    name: str
    schema: dict[str, Any]


# "auto" lets the model choose; "required" forces some tool; any other string forces that tool.
ToolChoice = str


@dataclass(frozen=True, slots=True)
class ModelCall:
    system: str
    turns: tuple[Turn, ...]
    max_output_tokens: int
    timeout_s: float
    temperature: float | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    output_schema: OutputSchema | None = None


class Finish(StrEnum):
    STOP = "stop"
    LENGTH = "length"  # truncated: a structured answer cut here is a failure
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ModelResult:
    text: str | None
    finish: Finish
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    tool_calls: tuple[ToolCall, ...] = field(default_factory=tuple)


class Provider(Protocol):
    """A tenant's model endpoint. Raises `worker.errors.ProviderError` on every failure."""

    @property
    def kind(self) -> str: ...

    @property
    def endpoint(self) -> str:
        """Where calls go (no credentials): the circuit breaker's key and what logs show."""
        ...

    @property
    def model(self) -> str: ...

    async def complete(self, call: ModelCall) -> ModelResult: ...

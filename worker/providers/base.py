"""The provider protocol: one neutral model call in, one neutral result out."""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

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

    async def complete(self, call: ModelCall) -> ModelResult:
        """One model call, not bounded in time here: `worker.providers.bounded` applies the call's timeout."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds (SDK clients); the shared HTTP session belongs to its owner."""
        ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a provider can tell about its model without a model call (Test Connection's discovery)."""

    found: bool | None = None  # None: this provider has no cheap way to list models
    context_window: int | None = None
    context_source: str | None = None  # how context_window was learned, e.g. "/api/show model_info"
    tools: bool | None = None  # the server's own capability list, where it has one


@runtime_checkable
class Describable(Protocol):
    """Optional: a provider that can describe its model (context window, capabilities) cheaply."""

    async def describe(self) -> ModelInfo:
        """Not bounded in time here either: the caller bounds it (`worker.providers.bounded.within`)."""
        ...


# How a provider delivers `ModelCall.output_schema`: a constrained schema, plain JSON mode, or only the prompt.
StructuredOutputMode = Literal["schema", "json_mode", "none"]


def structured_output_mode(provider: object) -> StructuredOutputMode:
    """A provider may expose `structured_output` to say it cannot enforce a schema; the default is that it can."""
    mode = getattr(provider, "structured_output", "schema")
    if mode == "json_mode":
        return "json_mode"
    if mode == "none":
        return "none"
    return "schema"

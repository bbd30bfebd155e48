"""The current span, read and set on OpenTelemetry's context variable directly where the runtime context is the
standard contextvars one: the API's helpers take four calls and a Context copy per read."""

from contextvars import ContextVar
from typing import Any

import structlog
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

log = structlog.get_logger("worker.tracing.current_span")


def _runtime_variable() -> tuple["ContextVar[Context] | None", str | None]:
    """OpenTelemetry's context variable and the key spans are kept under, where this API version has them."""
    runtime = getattr(context_api, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    key = getattr(trace.propagation, "_SPAN_KEY", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(variable, ContextVar) and isinstance(key, str):
        return variable, key
    return None, None  # another runtime context (OTEL_PYTHON_CONTEXT) or moved internals: the API's helpers


_VARIABLE, _KEY = _runtime_variable()


def current_span() -> trace.Span:
    """`trace.get_current_span()`."""
    if _VARIABLE is None:
        return trace.get_current_span()
    span: Any = _VARIABLE.get().get(_KEY)  # type: ignore[arg-type]
    return span if span is not None else trace.INVALID_SPAN


def attach(span: trace.Span) -> object:
    """`context.attach(trace.set_span_in_context(span))`: `span` is current until `detach(token)`."""
    if _VARIABLE is None:
        return context_api.attach(trace.set_span_in_context(span))
    values = dict(_VARIABLE.get())
    values[_KEY] = span  # type: ignore[index]
    return _VARIABLE.set(Context(values))


def detach(token: object) -> None:
    if _VARIABLE is None:
        context_api.detach(token)  # type: ignore[arg-type]
        return
    try:
        _VARIABLE.reset(token)  # type: ignore[arg-type]
    except Exception as error:  # as the API's detach: a token from another context is logged, never raised
        log.error("tracing_detach_failed", error=repr(error))

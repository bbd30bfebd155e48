"""structlog configured for one JSON object per line, with per-message context from contextvars, secrets masked."""

import logging
import sys
from typing import Any

import orjson
import structlog

from worker.redaction import redact_log_event


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure_logging(level: str = "info", *, json: bool = True, cache: bool = True) -> None:
    """`cache=False` lets tests capture events with `structlog.testing.capture_logs`."""
    renderer: Any = structlog.processors.JSONRenderer(serializer=_dumps) if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_log_event,  # last, so tracebacks and bound context are masked too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache,
    )
    # Libraries (aio-pika, aiormq, aiohttp) log through the standard library: render those as JSON lines too,
    # tracebacks included, so log shippers never meet a line they cannot parse.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_log_event,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # OpenTelemetry warns once per malformed member of a publisher's `tracestate` (up to 32 a delivery), quoting
    # it: publisher input must not be able to flood the log. The member is dropped either way.
    logging.getLogger("opentelemetry.trace.span").setLevel(logging.ERROR)

"""The command line's exit codes, and the one-line start-up errors that carry them."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum

import aio_pika

from worker.redaction import redact_text


class ExitCode(IntEnum):
    """Every code `atlas-worker` exits with; scripts and orchestrators may rely on them."""

    OK = 0
    FAILED = 1  # the command ran and says no: a provider not ready, a dead letter not found, a refused prompt
    USAGE = 2  # invalid flags or arguments (argparse's own code), or an invalid file named on the command line
    BROKER_UNREACHABLE = 3  # nothing answers AMQP at the broker URL (refused, timed out, not AMQP)
    BROKER_AUTH = 4  # the broker refused the user name or password
    METRICS_PORT_IN_USE = 5  # --metrics-host/--metrics-port cannot be bound
    TENANT_SOURCE = 6  # the tenants directory cannot be read at start-up
    INTERRUPTED = 130  # Ctrl-C in a command other than `run` (128 + SIGINT, as shells report it)


class StartupError(Exception):
    """A fault the operator must fix before the command can work: printed as one line, exits with `code`."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def broker_error(exc: BaseException, amqp_url: str) -> StartupError:
    """Classify a failed connection attempt; the URL is shown without its password."""
    where = redact_text(amqp_url)
    detail = redact_text(str(exc) or type(exc).__name__)
    if isinstance(exc, aio_pika.exceptions.ProbableAuthenticationError) or "ACCESS_REFUSED" in detail:
        return StartupError(ExitCode.BROKER_AUTH, f"the broker at {where} refused the credentials: {detail}")
    return StartupError(ExitCode.BROKER_UNREACHABLE, f"cannot reach the broker at {where}: {detail}")


@contextmanager
def first_connection() -> Iterator[None]:
    """Around a first connection attempt whose failure the caller reports as one line: the AMQP library would
    log the same failure again, with a traceback."""
    library = logging.getLogger("aiormq.connection")
    level = library.level
    library.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library.setLevel(level)

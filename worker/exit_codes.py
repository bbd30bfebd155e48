"""The command line's exit codes, and the one-line start-up errors that carry them."""

from enum import IntEnum


class ExitCode(IntEnum):
    """Every code `atlas-worker` exits with; scripts and orchestrators may rely on them."""

    OK = 0
    FAILED = 1  # the command ran and says no: a provider not ready, a dead letter not found, a refused prompt
    USAGE = 2  # invalid flags or arguments (argparse's own code), or an invalid file named on the command line
    BROKER_UNREACHABLE = 3  # nothing answers AMQP at the broker URL (refused, timed out, not AMQP)
    BROKER_AUTH = 4  # the broker refused the user name or password
    METRICS_PORT_IN_USE = 5  # --metrics-host/--metrics-port cannot be bound
    TENANT_SOURCE = 6  # the tenants directory cannot be read at start-up
    TOPOLOGY_MISMATCH = 7  # the namespace exists on the broker with other arguments (retry ladder, delivery limit)
    INTERRUPTED = 130  # Ctrl-C in a command other than `run` (128 + SIGINT, as shells report it)


class StartupError(Exception):
    """A fault the operator must fix before the command can work: printed as one line, exits with `code`."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

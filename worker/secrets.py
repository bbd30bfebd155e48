"""Resolves secret references (`env:NAME`, `file:/path`) at the moment a secret is needed, and makes every
resolved value known to the redaction facility, so no text the worker sends out can quote it."""

import os
import re
from pathlib import Path

from pydantic import SecretStr

from worker.errors import ErrorClass, ProviderError
from worker.files import FileRefused, read_regular_file
from worker.redaction import remember_secret

REFERENCE_PREFIXES = ("env:", "file:")
# Far above any key or service-account JSON; a `file:` reference to something bigger is a mistake, not a secret.
MAX_SECRET_FILE_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tabs and line ends allowed


class SecretUnresolved(ProviderError):
    """A secret reference that names nothing usable here: an unset or empty variable, a file that cannot be read,
    a value with a control character. The operator's fault, not the provider's: it is never rerouted."""

    def __init__(self, reference: str, message: str) -> None:
        super().__init__(ErrorClass.CONFIG, message, code="secret_unresolved")
        self.reference = reference  # `environment variable NAME` or `file /path`, for the fix hint


def is_reference(secret: SecretStr) -> bool:
    return secret.get_secret_value().startswith(REFERENCE_PREFIXES)


def resolve_secret(secret: SecretStr, *, lines: bool = False) -> str:
    """The secret's value. A reference that cannot be resolved is a config error naming the reference. `lines`:
    the value is a document (a service-account JSON key), not one line for a header, so it may hold newlines."""
    value = _resolve(secret.get_secret_value(), lines)
    remember_secret(value)
    return value


def _resolve(value: str, lines: bool) -> str:
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        resolved = os.environ.get(name)
        if resolved is None:
            raise SecretUnresolved(f"environment variable {name}", f"environment variable {name} is not set")
        # Stripped as a file's value is: a variable filled from a file (a Kubernetes Secret) often ends in a newline.
        return _usable(resolved.strip(), f"environment variable {name}", f"environment variable {name}", lines)
    if value.startswith("file:"):
        path = Path(value.removeprefix("file:"))
        try:
            # Read at each provider call, on the event loop: a FIFO or a huge file must not hold it.
            raw = read_regular_file(path, MAX_SECRET_FILE_BYTES)
        except FileRefused as refused:
            raise SecretUnresolved(f"file {path}", f"secret file {path} {refused}") from None
        except OSError as exc:
            raise SecretUnresolved(f"file {path}", f"cannot read secret file {path}: {exc.strerror}") from exc
        try:
            text = raw.decode().strip()
        except UnicodeDecodeError:
            raise SecretUnresolved(f"file {path}", f"secret file {path} is not UTF-8 text") from None
        return _usable(text, f"secret file {path}", f"file {path}", lines)
    return value


def _usable(value: str, what: str, reference: str, lines: bool) -> str:
    """`value`, unless it cannot be a credential: empty (an unfilled Secret would be sent as `Bearer `), or, for a
    one-line secret, with a control character, which no header may carry (aiohttp refuses it as an injection)."""
    if not value:
        raise SecretUnresolved(reference, f"{what} is empty")
    if (_CONTROL_IN_LINES if lines else _CONTROL).search(value):
        raise SecretUnresolved(reference, f"{what} holds a control character")
    return value


def reference_status(secret: SecretStr) -> str:
    """Whether a reference resolves in this process's environment, in words; never the value itself."""
    value = secret.get_secret_value()
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        resolved = os.environ.get(name)
        if resolved is None:
            return f"{value}: NOT SET in this environment"
        return f"{value}: set" if resolved.strip() else f"{value}: EMPTY in this environment"
    if value.startswith("file:"):
        path = Path(value.removeprefix("file:"))
        if path.exists() and not path.is_file():
            return f"{value}: NOT A REGULAR FILE here"
        if not path.is_file():
            return f"{value}: no such file here"
        return f"{value}: readable" if os.access(path, os.R_OK) else f"{value}: NOT READABLE here"
    return "a literal value, not a reference"

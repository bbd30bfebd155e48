"""Resolves secret references (`env:NAME`, `file:/path`) at the moment a secret is needed, and makes every
resolved value known to the redaction facility, so no text the worker sends out can quote it."""

import os
from pathlib import Path

from pydantic import SecretStr

from worker.errors import ErrorClass, ProviderError
from worker.files import FileRefused, read_regular_file
from worker.redaction import remember_secret

REFERENCE_PREFIXES = ("env:", "file:")
# Far above any key or service-account JSON; a `file:` reference to something bigger is a mistake, not a secret.
MAX_SECRET_FILE_BYTES = 64 * 1024


class SecretUnresolved(ProviderError):
    """A secret reference that names nothing here: an unset variable, or a file that cannot be read."""

    def __init__(self, reference: str, message: str) -> None:
        super().__init__(ErrorClass.AUTH, message, code="secret_unresolved")
        self.reference = reference  # `environment variable NAME` or `file /path`, for the fix hint


def is_reference(secret: SecretStr) -> bool:
    return secret.get_secret_value().startswith(REFERENCE_PREFIXES)


def resolve_secret(secret: SecretStr) -> str:
    """The secret's value. A reference that cannot be resolved is an auth error naming the reference."""
    value = _resolve(secret.get_secret_value())
    remember_secret(value)
    return value


def _resolve(value: str) -> str:
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        resolved = os.environ.get(name)
        if not resolved:
            raise SecretUnresolved(f"environment variable {name}", f"environment variable {name} is not set")
        return resolved
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
            return raw.decode().strip()
        except UnicodeDecodeError:
            raise SecretUnresolved(f"file {path}", f"secret file {path} is not UTF-8 text") from None
    return value


def reference_status(secret: SecretStr) -> str:
    """Whether a reference resolves in this process's environment, in words; never the value itself."""
    value = secret.get_secret_value()
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        return f"{value}: set" if os.environ.get(name) else f"{value}: NOT SET in this environment"
    if value.startswith("file:"):
        path = Path(value.removeprefix("file:"))
        if path.exists() and not path.is_file():
            return f"{value}: NOT A REGULAR FILE here"
        if not path.is_file():
            return f"{value}: no such file here"
        return f"{value}: readable" if os.access(path, os.R_OK) else f"{value}: NOT READABLE here"
    return "a literal value, not a reference"

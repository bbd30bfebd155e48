"""Resolves secret references (`env:NAME`, `file:/path`) at the moment a secret is needed."""

import os
from pathlib import Path

from pydantic import SecretStr

from worker.errors import ErrorClass, ProviderError

REFERENCE_PREFIXES = ("env:", "file:")


def is_reference(secret: SecretStr) -> bool:
    return secret.get_secret_value().startswith(REFERENCE_PREFIXES)


def resolve_secret(secret: SecretStr) -> str:
    """The secret's value. A reference that cannot be resolved is an auth error naming the reference."""
    value = secret.get_secret_value()
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        resolved = os.environ.get(name)
        if not resolved:
            raise ProviderError(ErrorClass.AUTH, f"environment variable {name} is not set", code="secret_unresolved")
        return resolved
    if value.startswith("file:"):
        path = Path(value.removeprefix("file:"))
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ProviderError(
                ErrorClass.AUTH, f"cannot read secret file {path}: {exc.strerror}", code="secret_unresolved"
            ) from exc
    return value


def reference_status(secret: SecretStr) -> str:
    """Whether a reference resolves in this process's environment, in words; never the value itself."""
    value = secret.get_secret_value()
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        return f"{value}: set" if os.environ.get(name) else f"{value}: NOT SET in this environment"
    if value.startswith("file:"):
        path = Path(value.removeprefix("file:"))
        if not path.is_file():
            return f"{value}: no such file here"
        return f"{value}: readable" if os.access(path, os.R_OK) else f"{value}: NOT READABLE here"
    return "a literal value, not a reference"

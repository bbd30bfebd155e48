"""Loads tenant configs from a directory of TOML files, validates them, and reloads them on change."""

import asyncio
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, SecretStr, ValidationError

from contracts import TenantConfig
from contracts.tenant import unknown_keys
from worker.secrets import is_reference

log = structlog.get_logger("worker.tenants")


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with one tenant file, named by file and field."""

    path: Path
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: {self.field}" if self.field else str(self.path)
        return f"{where}: {self.message}"


class TenantConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


def _literal_secret_fields(model: BaseModel, prefix: str = "") -> Iterator[str]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr) and not is_reference(value):
            yield f"{prefix}{name}"
        elif isinstance(value, BaseModel):
            yield from _literal_secret_fields(value, f"{prefix}{name}.")


def parse_tenant_config(data: dict[str, Any], path: Path, *, secrets_as_references: bool = True) -> TenantConfig:
    """Validate one tenant's settings; raises TenantConfigError naming every bad field."""
    try:
        config = TenantConfig.model_validate(data)
    except ValidationError as exc:
        raise TenantConfigError(
            [ConfigProblem(path, ".".join(str(p) for p in err["loc"]), err["msg"]) for err in exc.errors()]
        ) from None
    if secrets_as_references:
        literal = [
            ConfigProblem(path, field, "secrets must be references (env:NAME or file:/path), not values")
            for field in _literal_secret_fields(config)
        ]
        if literal:
            raise TenantConfigError(literal)
    return config


def load_tenant_file(path: Path) -> TenantConfig:
    """Read and validate `<tenant_id>.toml`; the file name must match its `tenant_id`."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TenantConfigError([ConfigProblem(path, "", f"not valid TOML: {exc}")]) from None
    except OSError as exc:
        raise TenantConfigError([ConfigProblem(path, "", f"cannot read: {exc.strerror}")]) from None
    config = parse_tenant_config(data, path)
    if config.tenant_id != path.stem:
        raise TenantConfigError(
            [ConfigProblem(path, "tenant_id", f"is {config.tenant_id!r} but the file is named {path.name!r}")]
        )
    return config


def validate_directory(directory: Path) -> tuple[list[TenantConfig], list[ConfigProblem]]:
    """Every tenant file in a directory: the good configs and the problems of the rest."""
    configs: list[TenantConfig] = []
    problems: list[ConfigProblem] = []
    if not directory.is_dir():
        return [], [ConfigProblem(directory, "", "is not a directory")]
    for path in sorted(directory.glob("*.toml")):
        try:
            configs.append(load_tenant_file(path))
        except TenantConfigError as exc:
            problems.extend(exc.problems)
    return configs, problems


class TenantRegistry:
    """The tenants this worker serves, kept current with the directory.

    A tenant whose file exists but does not validate is *quarantined*, never treated as unconfigured:
    unconfigured tenants are served by Atlas Cloud, and a typo must not send a BYOC tenant's data there.
    A broken edit of a tenant that loaded before keeps its last good config.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._configs: dict[str, TenantConfig] = {}
        self._broken: dict[str, list[ConfigProblem]] = {}
        self._seen: dict[Path, tuple[int, int]] = {}
        self.version = 0  # bumps on every change, so caches keyed on configs can notice

    def get(self, tenant_id: str) -> TenantConfig | None:
        return self._configs.get(tenant_id)

    def problems(self, tenant_id: str) -> list[ConfigProblem] | None:
        """Why a tenant's file is unusable, if it has a file that never loaded."""
        return self._broken.get(tenant_id)

    def tenants(self) -> list[str]:
        return sorted(self._configs)

    def refresh(self) -> bool:
        """Re-read files that changed since the last look. Returns whether anything changed."""
        current: dict[Path, tuple[int, int]] = {}
        if self.directory.is_dir():
            for path in self.directory.glob("*.toml"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                current[path] = (stat.st_mtime_ns, stat.st_size)
        changed = False
        for path in set(self._seen) - set(current):
            tenant_id = path.stem
            self._broken.pop(tenant_id, None)
            if self._configs.pop(tenant_id, None) is not None:
                log.warning("tenant_removed", tenant_id=tenant_id, file=str(path))
            changed = True
        for path, stamp in current.items():
            if self._seen.get(path) == stamp:
                continue
            changed = True
            self._load(path)
        self._seen = current
        if changed:
            self.version += 1
        return changed

    def _load(self, path: Path) -> None:
        tenant_id = path.stem
        try:
            config = load_tenant_file(path)
        except TenantConfigError as exc:
            errors = [str(p) for p in exc.problems]
            if tenant_id in self._configs:
                log.error(
                    "tenant_config_rejected",
                    tenant_id=tenant_id,
                    file=str(path),
                    errors=errors,
                    action="keeping the last good config",
                )
            else:
                self._broken[tenant_id] = exc.problems
                log.error(
                    "tenant_config_invalid",
                    tenant_id=tenant_id,
                    file=str(path),
                    errors=errors,
                    action="requests fail with tenant_config_invalid until the file is fixed",
                )
            return
        self._broken.pop(tenant_id, None)
        is_new = tenant_id not in self._configs
        self._configs[tenant_id] = config
        log.info(
            "tenant_loaded" if is_new else "tenant_reloaded",
            tenant_id=tenant_id,
            provider=config.provider.kind,
            policy=config.fallback.policy.value,
        )
        if extra := unknown_keys(config):
            log.warning("tenant_config_unknown_keys", tenant_id=tenant_id, file=str(path), unknown_keys=extra)

    async def watch(self, interval_s: float = 2.0) -> None:
        """Poll the directory until cancelled (portable, and cheap for a handful of files)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.refresh()
            except OSError as exc:
                log.error("tenant_directory_unreadable", directory=str(self.directory), error=str(exc))

"""Loads tenant configs from a directory of TOML files with one validator, and keeps them current.

Whether a tenant has a BYOC configuration is only ever concluded from a healthy source. A source that cannot be
read as a whole (missing, not a directory, unlistable, emptied at once, every file unreadable) is a *fault*: the
registry keeps every last-good config, says so in `fault`, and the app stops consuming until it is healthy again.
"""

import difflib
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import structlog
from pydantic import BaseModel, SecretStr, ValidationError

from contracts import TenantConfig
from contracts._base import TENANT_ID_PATTERN
from worker.files import FileRefused, read_regular_file
from worker.redaction import remember_url_credentials
from worker.secrets import REFERENCE_PREFIXES

log = structlog.get_logger("worker.tenants")

# An operator who means "no tenant of this deployment uses BYOC" says so with this file; without it an empty
# directory is indistinguishable from a volume that failed to mount or a ConfigMap swap gone wrong.
NO_TENANTS_MARKER = ".no-byoc-tenants"
TENANT_FILE_SUFFIX = ".toml"
TENANT_ID = re.compile(TENANT_ID_PATTERN)
MAX_TENANT_FILE_BYTES = 1024 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
Stamp = tuple[int, ...]
UNREADABLE: Stamp = (-1,)
UNREAD: Stamp = (-2,)  # seen, but its read failed: never equal to a stamp, so the next look reads it again


def _stamp(path: Path) -> Stamp:
    """What changes whenever a file's content or readability may have: the change time, which no tool can set,
    catches a rewrite of the same size with its modification time kept (`cp -p`, `rsync -t`) and a `chmod`
    that makes an unreadable file readable. UNREADABLE: listed but not there (a dangling symlink, a race with a
    ConfigMap swap); loading it records the problem once while it stays that way."""
    try:
        info = path.stat()
    except OSError:
        return UNREADABLE
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_mode, info.st_uid)


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
    """A tenant file that cannot be used; `declared_tenant_id` is the `tenant_id` it names, when it could be read."""

    def __init__(
        self, problems: list[ConfigProblem], declared_tenant_id: str | None = None, *, unreadable: bool = False
    ) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems
        self.declared_tenant_id = declared_tenant_id
        self.unreadable = unreadable  # reading it failed (EIO, EMFILE, EACCES): it may pass without the file changing


class TenantSourceFault(Exception):
    """The tenants directory cannot be read as a whole; nothing may be concluded about any tenant."""


# --- the one validator --------------------------------------------------------------------------------------


def _section_models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's annotation can hold (a section, an optional section, or the provider union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _section_models(arg)]


def _model_at(loc: tuple[int | str, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    """The model that a validation error's location points into, and that location in file terms (without the
    discriminator tag pydantic inserts for the provider union)."""
    model: type[BaseModel] = TenantConfig
    path: list[str] = []
    parts = list(loc)
    while parts:
        part = str(parts.pop(0))
        field = model.model_fields.get(part)
        if field is None:
            return None, [*path, part, *map(str, parts)]
        path.append(part)
        options = _section_models(field.annotation)
        if len(options) > 1 and parts:  # the provider union: the next part is its `kind` tag
            tag = str(parts.pop(0))
            options = [m for m in options if typing.get_args(m.model_fields["kind"].annotation) == (tag,)]
        if not options:
            return None, path + list(map(str, parts))
        model = options[0]
    return model, path


def _problem(path: Path, error: Any) -> ConfigProblem:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        section, where = _model_at(loc[:-1])
        key = str(loc[-1])
        known = list(section.model_fields) if section is not None else []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return ConfigProblem(path, ".".join([*where, key]), f"unknown key{hint}")
    _, where = _model_at(loc)
    return ConfigProblem(path, ".".join(where), error["msg"])


def url_fields(model: BaseModel) -> Iterator[str]:
    """Every URL of a configuration (endpoints, which may carry a `user:password@`)."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, str) and "://" in value:
            yield value
        elif isinstance(value, BaseModel):
            yield from url_fields(value)


def secret_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, SecretStr]]:
    """Every secret of a configuration, with its dotted field name."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            yield f"{prefix}{name}", value
        elif isinstance(value, BaseModel):
            yield from secret_fields(value, f"{prefix}{name}.")


def _reference_problem(value: str) -> str | None:
    if not value.startswith(REFERENCE_PREFIXES):
        return "secrets must be references (env:NAME or file:/path), not values"
    kind, _, target = value.partition(":")
    if kind == "env" and not ENV_NAME.fullmatch(target):
        return "env: needs a variable name, e.g. env:ACME_OPENAI_KEY"
    if kind == "file" and not target.startswith("/"):
        return "file: needs an absolute path, e.g. file:/run/secrets/acme-key"
    return None


def parse_tenant_config(data: dict[str, Any], path: Path) -> TenantConfig:
    """Validate one tenant's settings; raises TenantConfigError naming every bad field."""
    try:
        config = TenantConfig.model_validate(data)
    except ValidationError as exc:
        raise TenantConfigError([_problem(path, err) for err in exc.errors()]) from None
    bad = [
        ConfigProblem(path, field, message)
        for field, secret in secret_fields(config)
        if (message := _reference_problem(secret.get_secret_value())) is not None
    ]
    if bad:
        raise TenantConfigError(bad)
    for url in url_fields(config):
        remember_url_credentials(url)
    return config


def load_tenant_file(path: Path) -> TenantConfig:
    """Read and validate `<tenant_id>.toml`: the one validator behind `run`, reload, `tenants validate` and
    `test-connection --config`. Any fault of the file (unreadable, not UTF-8, not TOML, invalid) is an error."""
    try:
        # A FIFO or device named `x.toml` is refused instead of blocking the worker.
        raw = read_regular_file(path, MAX_TENANT_FILE_BYTES)
    except FileRefused as refused:
        raise TenantConfigError([ConfigProblem(path, "", str(refused))]) from None
    except OSError as exc:
        problem = ConfigProblem(path, "", f"cannot read: {exc.strerror or exc}")
        raise TenantConfigError([problem], unreadable=True) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = ConfigProblem(path, "", f"is not valid UTF-8 (byte {exc.start})")
        raise TenantConfigError([problem], _declared_in(raw)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TenantConfigError([ConfigProblem(path, "", f"not valid TOML: {exc}")], _declared_in(raw)) from None
    declared = data.get("tenant_id")
    declared = declared if isinstance(declared, str) and TENANT_ID.fullmatch(declared) else None
    if path.suffix != TENANT_FILE_SUFFIX:
        fix = f"tenant files end in {TENANT_FILE_SUFFIX!r}, in lower case: rename it to {path.stem}.toml"
        raise TenantConfigError([ConfigProblem(path, "", fix)], declared)
    try:
        config = parse_tenant_config(data, path)
    except TenantConfigError as exc:
        raise TenantConfigError(exc.problems, declared) from None
    if config.tenant_id != path.stem:
        raise TenantConfigError(
            [ConfigProblem(path, "tenant_id", f"is {config.tenant_id!r} but the file is named {path.name!r}")],
            declared,
        )
    return config


class Listing(NamedTuple):
    """A tenants directory as listed: its tenant files, the other names in it, which are not read, and whether it
    holds the marker that says no tenant uses BYOC."""

    paths: list[Path]
    ignored: list[str]
    marked: bool


def no_valid_tenant(directory: Path, files: int) -> str:
    """Why a directory none of whose files is a valid tenant is no tenant source: it is more likely the wrong one
    (the working directory's `pyproject.toml`, another service's config) than every tenant broken at once."""
    return (
        f"none of the {files} .toml files in {directory} is a valid tenant configuration, so it is not taken for "
        f"the tenants directory; if it is, fix them (`atlas-worker tenants validate`), or, if no tenant uses BYOC, "
        f"create {directory / NO_TENANTS_MARKER}"
    )


def list_directory(directory: Path) -> Listing:
    """The tenant files of a directory (a `.TOML` too, so that it is refused rather than passed over), and the
    names it does not read; raises TenantSourceFault when the directory cannot be trusted as a whole."""
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries]
    except FileNotFoundError:
        raise TenantSourceFault(f"{directory} does not exist") from None
    except NotADirectoryError:
        raise TenantSourceFault(f"{directory} is not a directory") from None
    except OSError as exc:
        raise TenantSourceFault(f"{directory} cannot be listed: {exc.strerror or exc}") from None
    visible = [name for name in names if not name.startswith(".")]  # dot names: a ConfigMap's own, editors' swap files
    tenant_files = {name for name in visible if name.lower().endswith(TENANT_FILE_SUFFIX)}
    if not tenant_files and NO_TENANTS_MARKER not in names:
        raise TenantSourceFault(
            f"{directory} holds no tenant files; if no tenant uses BYOC, create {directory / NO_TENANTS_MARKER}"
        )
    paths = sorted(directory / name for name in tenant_files)
    return Listing(paths, sorted(set(visible) - tenant_files), NO_TENANTS_MARKER in names)


# A `tenant_id` read from a file that does not parse, or is not a tenant file at all, so that its tenant is
# quarantined all the same: TOML's `tenant_id = "acme"`, YAML's `tenant_id: acme`, JSON's `"tenant_id": "acme"`.
_DECLARED = re.compile(
    rb"""(?:^|[{,])[ \t]*["']?tenant_id["']?[ \t]*[:=][ \t]*["']?([A-Za-z0-9][A-Za-z0-9_-]{0,63})""", re.MULTILINE
)
# Names of tenant files saved under a longer name: `acme.toml.txt`, `acme.toml.bak`, `acme.toml~`. Such a file
# quarantines the tenant its name starts with, whatever it holds; any other name only by what it declares.
_TENANT_FILE_COPY = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.toml.+", re.IGNORECASE | re.DOTALL)


def _declared_in(raw: bytes) -> str | None:
    found = _DECLARED.search(raw)
    return found.group(1).decode() if found else None


def _claimed_by_name(path: Path) -> list[str]:
    named = _TENANT_FILE_COPY.fullmatch(path.name)
    return [named.group(1)] if named else []


class Unreadable(Exception):
    """A file of the tenants directory that could not be read this time (EIO, EMFILE): nothing it claims is known."""


def misnamed(path: Path) -> tuple[list[str], ConfigProblem] | None:
    """A file of the tenants directory that is not read as a tenant file but is one saved under a longer name
    (`acme.toml.txt`, `acme.toml~`) or declares a `tenant_id` (`acme.yaml` holding `tenant_id: acme`): the tenants it
    claims and the problem that quarantines them, unless a valid file of its own configures each. Any other file
    (a README, a kustomization) is only ignored. Raises Unreadable when reading it failed."""
    claimed = _claimed_by_name(path)
    try:
        declared = _declared_in(read_regular_file(path, MAX_TENANT_FILE_BYTES))
    except FileRefused:  # a FIFO, a directory, something too large: no tenant file either way
        declared = None
    except OSError as exc:
        raise Unreadable(str(exc)) from None
    if declared is not None and declared not in claimed:
        claimed.append(declared)
    if not claimed:
        return None
    fix = f"is not read, since only <tenant_id>{TENANT_FILE_SUFFIX} files are: rename it to {claimed[-1]}.toml"
    return claimed, ConfigProblem(path, "", fix)


def scan_directory(directory: Path) -> list[Path]:
    """The tenant files of a directory; raises TenantSourceFault when the directory cannot be trusted as a whole."""
    return list_directory(directory).paths


def validate_path(path: Path) -> tuple[list[TenantConfig], list[ConfigProblem]]:
    """A tenant file, or every tenant file of a directory: the good configs and the problems of the rest."""
    if not path.is_dir() and path.suffix.lower() == TENANT_FILE_SUFFIX:
        listing = Listing([path], [], marked=True)
    else:
        try:
            listing = list_directory(path)
        except TenantSourceFault as fault:
            return [], [ConfigProblem(path, "", str(fault).removeprefix(f"{path} "))]
    configs: list[TenantConfig] = []
    problems: list[ConfigProblem] = []
    for file in listing.paths:
        try:
            configs.append(load_tenant_file(file))
        except TenantConfigError as exc:
            problems.extend(exc.problems)
    for name in listing.ignored:
        try:
            found = misnamed(path / name)
        except Unreadable as exc:
            problems.append(ConfigProblem(path / name, "", f"cannot read: {exc}"))
            continue
        if found is not None:
            problems.append(found[1])
    if not configs and not listing.marked:
        problems.append(ConfigProblem(path, "", no_valid_tenant(path, len(listing.paths)).removeprefix(f"{path} ")))
    return configs, problems


# --- the registry -------------------------------------------------------------------------------------------


class TenantRegistry:
    """The tenants this worker serves, kept current with the directory.

    - A tenant whose file exists but does not validate is *quarantined*, never treated as unconfigured:
      unconfigured tenants are served by Atlas Cloud, and a typo must not send a BYOC tenant's data there.
      A file that cannot be used quarantines the tenant it is named for and the one its `tenant_id` names, so a
      misnamed `acmee.toml` holding `tenant_id = "acme"` keeps acme's requests from Atlas Cloud.
    - A broken edit of a tenant that loaded before keeps its last good config.
    - A tenant leaves BYOC when its file is deleted while the directory stays healthy, and is still gone at the
      next reload (an editor saving by rename leaves the name missing for a moment). A directory that vanishes,
      cannot be listed, or loses every file at once is a fault, not a removal: everything is kept.
    """

    def __init__(self, directory: Path, *, on_fault: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self.fault: str | None = None  # why the source cannot be trusted right now; None while healthy
        self._on_fault = on_fault
        self._configs: dict[str, TenantConfig] = {}
        self._sources: dict[str, Path] = {}  # the file each config came from
        self._claims: dict[Path, tuple[list[str], list[ConfigProblem]]] = {}  # unusable files: ids they quarantine
        self._broken: dict[str, list[ConfigProblem]] = {}  # quarantined tenants (claimed, without a config)
        self._seen: dict[Path, Stamp] = {}
        self._misnamed_seen: dict[Path, Stamp] = {}  # files read only for the tenant_id they declare
        self._unreadable: set[Path] = set()  # files whose last read failed: read again at every look
        self._missing: set[Path] = set()  # gone at the last look: removed if still gone at this one
        self._ignored: set[str] = set()
        self._folded: dict[str, list[str]] = {}
        self.version = 0  # bumps on every change, so caches keyed on configs can notice

    @property
    def healthy(self) -> bool:
        return self.fault is None

    def get(self, tenant_id: str) -> TenantConfig | None:
        return self._configs.get(tenant_id)

    def problems(self, tenant_id: str) -> list[ConfigProblem] | None:
        """Why a tenant's file is unusable, if it has a file that never loaded."""
        return self._broken.get(tenant_id)

    def case_variant(self, tenant_id: str) -> str | None:
        """The configured tenant id that equals `tenant_id` except for letter case, if there is one."""
        for known in self._folded.get(tenant_id.casefold(), ()):
            if known != tenant_id:
                return known
        return None

    def tenants(self) -> list[str]:
        return sorted(self._configs)

    def quarantined(self) -> list[str]:
        return sorted(self._broken)

    def stale(self) -> list[str]:
        """Tenants served from a last-good config because their file on disk no longer validates: what the
        operator last wrote (a policy change, say) is not in force, and a worker started now would quarantine them."""
        return sorted(t for t in self._configs if self._sources[t] in self._claims)

    def refresh(self) -> bool:
        """Re-read files that changed since the last look. Returns whether anything changed. Never raises: a
        fault of the source, or an unexpected error, is recorded in `fault` with every last-good config kept."""
        try:
            return self._refresh()
        except TenantSourceFault as fault:
            self._faulted(str(fault))
        except Exception as exc:  # a bug must not kill the watcher or pass for "no config"
            log.exception("tenant_refresh_crashed", directory=str(self.directory))
            self._faulted(f"reading {self.directory} failed: {type(exc).__name__}")
        return False

    def _faulted(self, reason: str) -> None:
        if self.fault != reason:
            log.error(
                "tenant_source_fault",
                directory=str(self.directory),
                reason=reason,
                action="keeping every last-good config and not consuming until the source is healthy",
            )
        self.fault = reason
        if self._on_fault is not None:
            self._on_fault(reason)

    def _refresh(self) -> bool:
        listing = list_directory(self.directory)
        current = {path: _stamp(path) for path in listing.paths}
        if current and all(stamp == UNREADABLE for stamp in current.values()):
            raise TenantSourceFault(f"none of the {len(current)} tenant files in {self.directory} can be read")
        self._note_ignored(listing.ignored)
        changed = self._forget_removed(set(current))
        changed |= self._read_misnamed([self.directory / name for name in listing.ignored])
        for path, stamp in current.items():
            if self._seen.get(path) != stamp:
                self._load(path)
                changed = True
            elif path in self._unreadable:  # a read error may pass without the file changing: read it again
                changed |= self._load(path, again=True)
        # A file gone for the first time is still counted as seen, so the next look can confirm it is gone.
        self._seen = current | {path: self._seen[path] for path in self._missing}
        if changed:
            self.version += 1
            self._broken = {}
            for claimed, problems in self._claims.values():
                for tenant_id in claimed:
                    if tenant_id not in self._configs:
                        self._broken.setdefault(tenant_id, problems)
            self._folded = {}
            for tenant_id in [*self._configs, *self._broken]:
                self._folded.setdefault(tenant_id.casefold(), []).append(tenant_id)
        if not self._configs and not listing.marked:
            raise TenantSourceFault(no_valid_tenant(self.directory, len(current)))
        if self.fault is not None:
            log.info("tenant_source_healthy", directory=str(self.directory), previous_fault=self.fault)
            self.fault = None
        return changed

    def _read_misnamed(self, paths: list[Path]) -> bool:
        """Claims of files that are not read as tenant files but declare a tenant, kept current; whether any
        changed. Such a claim is not a config: it only quarantines a tenant that nothing else configures."""
        changed = False
        for path in set(self._misnamed_seen) - set(paths):
            del self._misnamed_seen[path]
            changed |= self._claims.pop(path, None) is not None
        for path in paths:
            stamp = _stamp(path)
            if self._misnamed_seen.get(path) == stamp:
                continue
            try:
                found = misnamed(path)
            except Unreadable:
                # Nothing it claims is known: keep what it claimed before, add its name's, read it again next look.
                claimed = sorted({*self._claims.get(path, ([], []))[0], *_claimed_by_name(path)})
                if claimed:
                    problem = ConfigProblem(path, "", "cannot be read; it may configure this tenant")
                    changed |= self._claims.get(path) != (claimed, [problem])
                    self._claims[path] = (claimed, [problem])
                self._misnamed_seen[path] = UNREAD  # matches no stamp: read again at the next look
                continue
            self._misnamed_seen[path] = stamp
            if found is None:
                changed |= self._claims.pop(path, None) is not None
                continue
            claimed, problem = found
            self._claims[path] = (claimed, [problem])
            log.error("tenant_file_misnamed", tenant_ids=claimed, file=str(path), error=str(problem))
            changed = True
        return changed

    def _note_ignored(self, names: list[str]) -> None:
        for name in set(names) - self._ignored:
            log.warning(
                "tenant_file_ignored",
                directory=str(self.directory),
                file=name,
                reason=f"only <tenant_id>{TENANT_FILE_SUFFIX} files are tenant configurations",
            )
        self._ignored = set(names)

    def _forget_removed(self, present: set[Path]) -> bool:
        gone = {path for path in self._seen if path not in present}
        confirmed, self._missing = gone & self._missing, gone - self._missing
        for path in sorted(self._missing):
            log.warning(
                "tenant_file_missing",
                file=str(path),
                action="its tenant leaves BYOC if the file is still missing at the next reload",
            )
        for path in sorted(confirmed):
            self._claims.pop(path, None)
            self._unreadable.discard(path)
            tenant_id = path.stem
            if self._sources.get(tenant_id) == path:
                del self._configs[tenant_id], self._sources[tenant_id]
                log.warning("tenant_removed", tenant_id=tenant_id, file=str(path))
        return bool(confirmed)

    def _load(self, path: Path, *, again: bool = False) -> bool:
        """Read one tenant file; whether what the registry holds changed. `again`: the file has not changed since
        its last read failed, which is not said twice."""
        try:
            config = load_tenant_file(path)
        except TenantConfigError as exc:
            if exc.unreadable:
                self._unreadable.add(path)
            else:
                self._unreadable.discard(path)
            return self._rejected(path, exc, again=again)
        self._unreadable.discard(path)
        tenant_id = config.tenant_id
        self._claims.pop(path, None)
        is_new = tenant_id not in self._configs
        self._configs[tenant_id], self._sources[tenant_id] = config, path
        log.info(
            "tenant_loaded" if is_new else "tenant_reloaded",
            tenant_id=tenant_id,
            provider=config.provider.kind,
            policy=config.fallback.policy.value,
        )
        return True

    def _rejected(self, path: Path, exc: TenantConfigError, *, again: bool = False) -> bool:
        claimed = [path.stem]
        if exc.declared_tenant_id is not None and exc.declared_tenant_id != path.stem:
            claimed.append(exc.declared_tenant_id)
        if exc.unreadable:  # what it declared is not known this time: it still claims what it claimed before
            claimed += [t for t in self._claims.get(path, ([], []))[0] if t not in claimed]
        if again and self._claims.get(path) == (claimed, exc.problems):
            return False  # read again and failing as before: said already
        self._claims[path] = (claimed, exc.problems)
        errors = [str(p) for p in exc.problems]
        for tenant_id in claimed:
            if tenant_id in self._configs:
                event, action = "tenant_config_rejected", "keeping the last good config"
            else:
                event, action = "tenant_config_invalid", "requests fail with tenant_config_invalid until it is fixed"
            log.error(event, tenant_id=tenant_id, file=str(path), errors=errors, action=action)
        return True

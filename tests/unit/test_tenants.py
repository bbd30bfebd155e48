"""Tenant registry: files validated with errors naming file and field; secrets stay references; live reload."""

import errno
import os
import re
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from contracts import FallbackPolicy
from worker import files, tenants
from worker.tenants import NO_TENANTS_MARKER, TenantConfigError, TenantRegistry, load_tenant_file

GOOD = """
tenant_id = "acme"
[provider]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key = "env:ACME_KEY"
[fallback]
policy = "queue_and_retry"
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    # Make the change visible to mtime-based polling even within one clock tick.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    return path


def test_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    config = load_tenant_file(write(tmp_path, "acme", GOOD))

    assert config.fallback.policy is FallbackPolicy.QUEUE_AND_RETRY
    assert config.limits.max_concurrency == 16
    assert config.provider.kind == "openai_compatible"


def test_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "acme", GOOD.replace('policy = "queue_and_retry"', 'policy = "sometimes"'))

    with pytest.raises(TenantConfigError) as caught:
        load_tenant_file(path)

    assert str(path) in str(caught.value)
    assert "fallback.policy" in str(caught.value)


def test_unknown_provider_kind_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "acme", GOOD.replace('"openai_compatible"', '"palm"'))

    with pytest.raises(TenantConfigError, match="provider"):
        load_tenant_file(path)


def test_literal_secret_in_a_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = write(tmp_path, "acme", GOOD.replace("env:ACME_KEY", "sk-live-1234567890"))

    with pytest.raises(TenantConfigError) as caught:
        load_tenant_file(path)

    assert "provider.api_key" in str(caught.value)
    assert "sk-live-1234567890" not in str(caught.value)


def test_file_name_must_match_tenant_id(tmp_path: Path) -> None:
    with pytest.raises(TenantConfigError, match="tenant_id"):
        load_tenant_file(write(tmp_path, "globex", GOOD))


def test_broken_edit_keeps_the_last_good_config_and_logs_why(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "acme", GOOD)
    registry.refresh()

    write(tmp_path, "acme", GOOD.replace("[fallback]", "[fallback"))
    with capture_logs() as logs:
        changed = registry.refresh()

    assert changed
    config = registry.get("acme")
    assert config is not None
    assert config.fallback.policy is FallbackPolicy.QUEUE_AND_RETRY
    assert [e["event"] for e in logs] == ["tenant_config_rejected"]
    assert "not valid TOML" in logs[0]["errors"][0]
    assert registry.stale() == ["acme"]  # what the operator wrote is not in force: the gauge and alert say so
    assert registry.quarantined() == []

    write(tmp_path, "acme", GOOD)
    registry.refresh()
    assert registry.stale() == []


def test_changes_are_picked_up_without_restart(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "acme", GOOD)
    registry.refresh()

    write(tmp_path, "acme", GOOD.replace("queue_and_retry", "fail_closed"))
    registry.refresh()

    config = registry.get("acme")
    assert config is not None
    assert config.fallback.policy is FallbackPolicy.FAIL_CLOSED


def test_a_tenant_whose_file_never_validated_is_quarantined_not_unconfigured(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "acme", GOOD.replace('model = "m"', ""))

    registry.refresh()

    assert registry.get("acme") is None
    problems = registry.problems("acme")
    assert problems is not None
    assert problems[0].field == "provider.model"
    assert registry.problems("globex") is None  # truly unconfigured: served by Atlas Cloud


def test_deleted_file_removes_the_tenant_while_the_directory_stays_healthy(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    path = write(tmp_path, "acme", GOOD)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    registry.refresh()

    path.unlink()
    with capture_logs() as logs:
        registry.refresh()
    assert registry.get("acme") is not None  # gone once: perhaps an editor saving by rename
    assert [e["event"] for e in logs] == ["tenant_file_missing"]

    registry.refresh()

    assert registry.get("acme") is None
    assert registry.problems("acme") is None
    assert registry.healthy


def test_a_file_saved_by_rename_never_takes_its_tenant_off_byoc(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    path = write(tmp_path, "acme", GOOD)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    registry.refresh()

    # vim's default save: the old file renamed to a backup, then the new one written; a reload in between.
    with capture_logs() as logs:
        path.rename(tmp_path / "acme.toml~")
        registry.refresh()
        assert registry.get("acme") is not None
        write(tmp_path, "acme", GOOD.replace("queue_and_retry", "fail_closed"))
        registry.refresh()
        registry.refresh()

    config = registry.get("acme")
    assert config is not None
    assert config.fallback.policy is FallbackPolicy.FAIL_CLOSED
    assert "tenant_removed" not in [e["event"] for e in logs]


def test_a_misnamed_file_quarantines_the_tenant_it_declares(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    write(tmp_path, "acmee", GOOD.replace("queue_and_retry", "fail_closed"))  # a typo in the file name

    with capture_logs() as logs:
        registry.refresh()

    assert registry.get("acme") is None
    problems = registry.problems("acme")
    assert problems is not None  # not "no BYOC config": acme's requests must not go to Atlas Cloud
    assert "is 'acme' but the file is named 'acmee.toml'" in problems[0].message
    assert registry.problems("acmee") is not None
    assert {e["tenant_id"] for e in logs if e["event"] == "tenant_config_invalid"} == {"acme", "acmee"}


@pytest.mark.parametrize("breakage", ["not TOML", "not UTF-8"])
def test_a_misnamed_file_that_does_not_parse_still_quarantines_the_tenant_it_declares(
    tmp_path: Path, breakage: str
) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    broken = GOOD.replace("[fallback]", "[fallback") if breakage == "not TOML" else GOOD.replace("model", "mod\xe9l")
    (tmp_path / "acmee.toml").write_bytes(broken.encode("latin-1"))

    registry.refresh()

    assert registry.problems("acme") is not None
    assert registry.problems("acmee") is not None


def test_a_stray_file_declaring_a_tenant_keeps_it_quarantined_once_its_own_file_is_deleted(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    own = write(tmp_path, "acme", GOOD)
    write(tmp_path, "acme-old", GOOD)  # also says tenant_id = "acme"
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    registry.refresh()
    assert registry.get("acme") is not None  # its own file wins while it is there

    own.unlink()
    registry.refresh()
    registry.refresh()

    assert registry.get("acme") is None
    assert registry.problems("acme") is not None  # which file is acme's? Not a question to answer by guessing


def test_an_upper_case_extension_quarantines_its_tenant_with_the_fix(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    (tmp_path / "acme.TOML").write_text(GOOD)

    registry.refresh()

    problems = registry.problems("acme")
    assert problems is not None
    assert "rename it to acme.toml" in problems[0].message


def test_other_files_in_the_directory_are_named_in_a_warning_once(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    (tmp_path / "acme.yaml").write_text("tenant_id: acme\n")
    (tmp_path / ".acme.toml.swp").write_text("")  # dot names (editors, ConfigMaps) are not mentioned

    with capture_logs() as logs:
        registry.refresh()
        registry.refresh()

    assert [(e["event"], e["file"]) for e in logs if e["log_level"] == "warning"] == [
        ("tenant_file_ignored", "acme.yaml")
    ]
    assert registry.get("acme") is None


def test_the_last_tenant_leaves_byoc_only_with_the_marker(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    path = write(tmp_path, "acme", GOOD)
    registry.refresh()

    path.unlink()
    registry.refresh()
    assert registry.get("acme") is not None  # emptied at once: a fault, everything kept
    assert registry.fault is not None
    assert NO_TENANTS_MARKER in registry.fault

    (tmp_path / NO_TENANTS_MARKER).touch()
    registry.refresh()
    registry.refresh()
    assert registry.healthy
    assert registry.get("acme") is None


@pytest.mark.parametrize("fault", ["removed", "replaced_by_a_file", "dangling_symlinks"])
def test_a_faulty_source_keeps_every_last_good_config_and_says_why(tmp_path: Path, fault: str) -> None:
    directory = tmp_path / "tenants"
    directory.mkdir()
    write(directory, "acme", GOOD)
    registry = TenantRegistry(directory)
    registry.refresh()
    assert registry.healthy

    with capture_logs() as logs:
        if fault == "removed":
            (directory / "acme.toml").unlink()
            directory.rmdir()
        elif fault == "replaced_by_a_file":
            (directory / "acme.toml").unlink()
            directory.rmdir()
            directory.write_text("oops")
        else:  # a ConfigMap whose ..data target vanished: the tenant files are links to nowhere
            (directory / "acme.toml").unlink()
            (directory / "acme.toml").symlink_to(directory / "..data" / "acme.toml")
        registry.refresh()

    assert not registry.healthy
    assert registry.get("acme") is not None
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["tenant_source_fault"]


def test_a_file_that_is_not_utf8_quarantines_its_tenant_and_others_still_load(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    (tmp_path / "acme.toml").write_bytes(GOOD.encode().replace(b"acme", b"acm\xe9"))
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    registry.refresh()

    problems = registry.problems("acme")
    assert problems is not None
    assert "not valid UTF-8" in problems[0].message
    assert registry.healthy
    assert registry.get("globex") is not None


def test_a_fifo_named_like_a_tenant_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "acme.toml")
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    registry = TenantRegistry(tmp_path)

    registry.refresh()

    problems = registry.problems("acme")
    assert problems is not None
    assert "not a regular file" in problems[0].message


@pytest.mark.parametrize(
    ("edit", "field", "hint"),
    [
        (("[fallback]", "[fallbak]"), "fallbak", "did you mean 'fallback'?"),
        (('api_key = "env:ACME_KEY"', 'apikey = "sk-live-123"'), "provider.apikey", "did you mean 'api_key'?"),
        (("[fallback]", "[limits]\nmax_concurency = 3\n[fallback]"), "limits.max_concurency", "'max_concurrency'"),
    ],
)
def test_unknown_keys_are_errors_with_a_suggestion(
    tmp_path: Path, edit: tuple[str, str], field: str, hint: str
) -> None:
    path = write(tmp_path, "acme", GOOD.replace(*edit))

    with pytest.raises(TenantConfigError) as caught:
        load_tenant_file(path)

    [problem] = [p for p in caught.value.problems if p.field == field]
    assert hint in problem.message
    assert "sk-live-123" not in str(caught.value)


BEDROCK = """
tenant_id = "acme"
[provider]
kind = "bedrock"
region = "eu-central-1"
model_id = "anthropic.claude-3-5-sonnet-20240620-v1:0"
"""


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (BEDROCK + 'access_key_id = "env:AWS_KEY"\n', "go together"),
        (BEDROCK + 'role_arn = "arn:aws:iam::12:role/x"\n', "not an IAM role ARN"),
        (GOOD.replace("env:ACME_KEY", "env:"), "env: needs a variable name"),
        (GOOD.replace("env:ACME_KEY", "file:relative/key"), "file: needs an absolute path"),
        (GOOD.replace("http://127.0.0.1:9/v1", "127.0.0.1:9/v1"), "not an http(s) URL"),
        (GOOD.replace('model = "m"', 'model = "m"\ncontext_window = 8192'), "greater than or equal to 32768"),
        (
            'tenant_id = "acme"\n[provider]\nkind = "vertex"\nproject = "p"\nlocation = "europe-west4"\n'
            'model = "text-bison@002"\nservice_account = "file:/k.json"\n',
            "retired",
        ),
    ],
)
def test_the_validator_catches_what_would_fail_later(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(TenantConfigError, match=re.escape(needle)):
        load_tenant_file(write(tmp_path, "acme", text))


def test_a_tenant_id_differing_only_in_case_is_found_as_a_variant(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "acme", GOOD)
    registry.refresh()

    assert registry.case_variant("ACME") == "acme"
    assert registry.case_variant("acme") is None
    assert registry.case_variant("globex") is None


def test_example_tenants_in_the_repository_validate() -> None:
    from worker.tenants import validate_path

    configs, problems = validate_path(Path(__file__).parents[2] / "tenants")
    assert problems == []
    assert {c.tenant_id for c in configs} >= {"acme", "globex"}


YAML_ACME = "tenant_id: acme\nprovider:\n  kind: openai_compatible\nfallback:\n  policy: fail_closed\n"
JSON_ACME = '{"tenant_id":"acme","fallback":{"policy":"fail_closed"}}'


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("acme.toml.txt", GOOD),
        ("acme.toml~", GOOD),
        ("acme", GOOD),  # no extension: the tenant it declares
        ("notes.txt", GOOD),  # another name: the tenant it declares too
        ("acme.yaml", YAML_ACME),
        ("acme.toml.bak", "# nothing that parses as a tenant\n"),  # the name alone: a copy of acme.toml
        ("acme.json", JSON_ACME),
    ],
)
def test_a_file_not_named_as_a_tenant_file_still_quarantines_the_tenant_it_declares(
    tmp_path: Path, name: str, text: str
) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    stray = tmp_path / name
    stray.write_text(text.replace("queue_and_retry", "fail_closed"))

    with capture_logs() as logs:
        registry.refresh()

    assert registry.get("acme") is None
    problems = registry.problems("acme")  # quarantined: never "no BYOC config", which Atlas Cloud serves
    assert problems is not None
    assert "rename it to acme.toml" in problems[0].message
    assert [e["file"] for e in logs if e["event"] == "tenant_file_misnamed"] == [str(stray)]

    stray.unlink()  # the fix: the configuration saved as acme.toml
    write(tmp_path, "acme", GOOD.replace("queue_and_retry", "fail_closed"))
    registry.refresh()
    assert registry.problems("acme") is None
    config = registry.get("acme")
    assert config is not None
    assert config.fallback.policy is FallbackPolicy.FAIL_CLOSED


def test_a_backup_beside_a_valid_tenant_file_quarantines_nothing_and_a_readme_is_only_ignored(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "acme", GOOD)
    (tmp_path / "acme.toml.bak").write_text(GOOD.replace("queue_and_retry", "atlas_cloud"))
    (tmp_path / "README.md").write_text("Tenant files for the worker; see the runbook.\n")
    (tmp_path / "README.txt").write_text("Tenant files for the worker.\n")
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - deployment.yaml\n")

    registry.refresh()

    config = registry.get("acme")
    assert config is not None
    assert config.fallback.policy is FallbackPolicy.QUEUE_AND_RETRY
    assert registry.quarantined() == []
    assert registry.healthy


def test_a_directory_none_of_whose_files_is_a_tenant_is_a_fault_not_an_empty_registry(tmp_path: Path) -> None:
    # The working directory taken for the tenants directory: its pyproject.toml is no tenant.
    registry = TenantRegistry(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "something-else"\n')

    registry.refresh()

    assert registry.fault is not None
    assert "none of the 1 .toml files" in registry.fault
    assert NO_TENANTS_MARKER in registry.fault

    write(tmp_path, "acme", GOOD)
    registry.refresh()
    assert registry.healthy
    assert registry.get("acme") is not None


def test_a_rewrite_of_the_same_size_with_its_modification_time_kept_is_still_picked_up(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    path = tmp_path / "acme.toml"
    path.write_text(GOOD.replace("queue_and_retry", "atlas_cloud"))
    registry.refresh()
    before = path.stat()

    # `cp -p` or `rsync --inplace -t`: the same inode, the same size (both policies are 11 characters), the same
    # modification time. Only the change time, which no tool can set, moves.
    with path.open("r+") as rewritten:
        rewritten.write(GOOD.replace("queue_and_retry", "fail_closed"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)

    assert registry.refresh()
    config = registry.get("acme")
    assert config is not None
    assert config.fallback.policy is FallbackPolicy.FAIL_CLOSED


def test_a_read_error_that_passes_is_retried_though_the_file_never_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EIO on a network volume, EMFILE under load: the file is the same, only reading it failed.
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    write(tmp_path, "acme", GOOD)
    read = files.read_regular_file
    failing = {"acme.toml"}

    def flaky(path: Path, limit: int) -> bytes:
        if path.name in failing:
            raise OSError(errno.EIO, "Input/output error")
        return read(path, limit)

    monkeypatch.setattr(tenants, "read_regular_file", flaky)
    with capture_logs() as logs:
        registry.refresh()
        registry.refresh()  # still failing: read again, not said again
    assert registry.get("acme") is None
    problems = registry.problems("acme")
    assert problems is not None
    assert "Input/output error" in problems[0].message
    assert [e["event"] for e in logs if e.get("tenant_id") == "acme"] == ["tenant_config_invalid"]

    failing.clear()
    assert registry.refresh()
    assert registry.get("acme") is not None
    assert registry.problems("acme") is None


def test_a_file_that_cannot_be_read_keeps_quarantining_what_it_claimed_until_it_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Quarantines rest on reading files; a read that fails (EMFILE under load) tells nothing, so it lifts none.
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    write(tmp_path, "acmee", GOOD.replace("queue_and_retry", "fail_closed"))  # a typo in the name: claims acme
    (tmp_path / "notes.txt").write_text(GOOD.replace('"acme"', '"initech"'))  # declares initech
    registry.refresh()
    assert registry.quarantined() == ["acme", "acmee", "initech"]

    read = files.read_regular_file
    failing = True

    def flaky(path: Path, limit: int) -> bytes:
        if failing and path.name in ("acmee.toml", "notes.txt"):
            raise OSError(errno.EMFILE, "Too many open files")
        return read(path, limit)

    monkeypatch.setattr(tenants, "read_regular_file", flaky)
    for path in (tmp_path / "acmee.toml", tmp_path / "notes.txt"):  # rewritten while reads fail
        path.write_text(path.read_text() + "\n")
    registry.refresh()
    registry.refresh()
    assert registry.quarantined() == ["acme", "acmee", "initech"]

    failing = False
    registry.refresh()
    assert registry.quarantined() == ["acme", "acmee", "initech"]  # read again: what they say holds


def test_a_misnamed_file_that_could_not_be_read_and_is_then_deleted_claims_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "globex", GOOD.replace('"acme"', '"globex"'))
    stray = tmp_path / "acme.toml.bak"
    stray.write_text(GOOD)
    read = files.read_regular_file

    def failing(path: Path, limit: int) -> bytes:
        if path.name == stray.name:
            raise OSError(errno.EIO, "Input/output error")
        return read(path, limit)

    monkeypatch.setattr(tenants, "read_regular_file", failing)
    registry.refresh()
    assert registry.quarantined() == ["acme"]

    stray.unlink()
    registry.refresh()
    assert registry.quarantined() == []

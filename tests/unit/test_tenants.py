"""Tenant registry: files validated with errors naming file and field; secrets stay references; live reload."""

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from contracts import FallbackPolicy
from worker.tenants import TenantConfigError, TenantRegistry, load_tenant_file

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
    assert problems[0].field == "provider.openai_compatible.model"
    assert registry.problems("globex") is None  # truly unconfigured: served by Atlas Cloud


def test_deleted_file_removes_the_tenant(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    path = write(tmp_path, "acme", GOOD)
    registry.refresh()

    path.unlink()
    registry.refresh()

    assert registry.get("acme") is None


def test_unknown_keys_are_warned_about(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    write(tmp_path, "acme", GOOD + "[limits]\nmax_concurency = 3\n")

    with capture_logs() as logs:
        registry.refresh()

    assert logs[0]["unknown_keys"] == ["limits.max_concurency"]


def test_example_tenants_in_the_repository_validate() -> None:
    from worker.tenants import validate_directory

    configs, problems = validate_directory(Path(__file__).parents[2] / "tenants")
    assert problems == []
    assert {c.tenant_id for c in configs} >= {"acme", "globex"}

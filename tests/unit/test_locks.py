"""The lock files still satisfy pyproject.toml: every requirement pinned, in range, with hashes."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
DEV = [Requirement(r) for r in PROJECT["optional-dependencies"]["dev"]]
OTEL = [Requirement(r) for r in PROJECT["optional-dependencies"]["otel"]]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", re.MULTILINE)


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / lock).read_text()
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [("runtime.txt", RUNTIME), ("dev.txt", RUNTIME + DEV), ("otel.txt", RUNTIME + OTEL)],
    ids=["runtime", "dev", "otel"],
)
def test_every_requirement_is_pinned_within_its_range(lock: str, requirements: list[Requirement]) -> None:
    pinned = pins(lock)
    problems = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement} is not in requirements/{lock}")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"requirements/{lock} pins {requirement.name}=={version}, outside {requirement}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


@pytest.mark.parametrize("lock", ["runtime.txt", "dev.txt", "otel.txt"])
def test_every_pin_has_a_hash(lock: str) -> None:
    entries = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements" / lock).read_text())
    unhashed = [entry.split()[0] for entry in entries if PIN.match(entry) and "--hash=sha256:" not in entry]
    assert unhashed == []


def test_the_runtime_lock_holds_no_dev_tools() -> None:
    # Dev extras a runtime dependency also needs (cryptography, for google-auth) may be there; tools may not.
    tools = {"pytest", "pytest-asyncio", "hypothesis", "mypy", "ruff", "pip-tools", "py-spy", "testcontainers"}
    assert tools & set(pins("runtime.txt")) == set()


def test_the_image_and_make_install_from_the_locks() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --no-cache-dir --require-hashes -r /tmp/runtime.txt" in dockerfile
    # The image's lock is the runtime lock plus the `otel` extra, pinned alike.
    assert "COPY requirements/otel.txt" in dockerfile
    assert pins("runtime.txt").items() <= pins("otel.txt").items()
    assert "--require-hashes -r $(RUNTIME_LOCK)" in makefile
    assert "--require-hashes -r $(DEV_LOCK)" in makefile

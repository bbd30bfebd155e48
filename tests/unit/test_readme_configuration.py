"""The README's configuration reference stays true: every complete tenant file in it validates."""

import re
import tomllib
from pathlib import Path

import pytest

from worker.tenants import parse_tenant_config

README = Path(__file__).parent.parent.parent / "README.md"


def tenant_files() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Configuration reference\n", 1)[1].split("\n## ", 1)[0]
    return [block for block in re.findall(r"```toml\n(.*?)```", section, re.DOTALL) if "tenant_id" in block]


def test_there_is_a_complete_file_for_every_provider_kind() -> None:
    kinds = {tomllib.loads(block)["provider"]["kind"] for block in tenant_files()}
    assert kinds == {"azure_openai", "bedrock", "vertex", "openai_compatible", "ollama"}


@pytest.mark.parametrize("block", tenant_files(), ids=lambda b: tomllib.loads(b)["tenant_id"])
def test_each_example_validates_with_secrets_as_references(block: str) -> None:
    data = tomllib.loads(block)
    parse_tenant_config(data, Path(f"{data['tenant_id']}.toml"))

"""The README's configuration reference stays true: its table of keys is current, every complete tenant file in it
validates, and its table of contents leads somewhere."""

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from contracts.config_reference import table, with_table
from contracts.tenant import (
    AzureOpenAISettings,
    BedrockSettings,
    Fallback,
    Limits,
    Pricing,
    VertexSettings,
)
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


def test_the_table_of_every_key_is_generated_from_the_models() -> None:
    assert with_table(README.read_text()) == README.read_text(), "run `make docs` to regenerate the table"


def test_the_table_has_a_row_for_every_key_of_every_model() -> None:
    rows = table()
    sections: list[tuple[type[BaseModel], str]] = [(Fallback, "fallback"), (Limits, "limits"), (Pricing, "pricing")]
    sections += [(model, "provider") for model in (AzureOpenAISettings, BedrockSettings, VertexSettings)]
    for model, prefix in sections:
        for name in model.model_fields:
            assert f"| `{prefix}.{name}` |" in rows, name
    assert "| `tenant_id` | top level | string | required |" in rows
    assert '| `provider.api_key` | `[provider]` with kind = `"azure_openai"` | secret reference | required |' in rows
    assert "| `fallback.max_attempts` | `[fallback]` | integer | `5` | ≥ 1, ≤ 50 |" in rows


def github_anchor(heading: str) -> str:
    """How GitHub turns a heading into a link target."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return "#" + text.replace(" ", "-")


def test_every_link_of_the_table_of_contents_leads_to_a_heading() -> None:
    text = README.read_text()
    contents = text.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,6} (.+)$", text, re.MULTILINE)}
    links = re.findall(r"\]\((#[^)]+)\)", contents)
    assert links
    assert [link for link in links if link not in anchors] == []

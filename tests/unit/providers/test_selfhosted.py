"""vLLM's and TGI's quirks through the OpenAI-compatible provider: TGI's grammar shape, windows, forced-only tools."""

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from contracts import ConnectionReport, OpenAICompatibleSettings, RcaResult
from tests.fakes.selfhosted_server import FakeTGI, FakeVLLM
from tests.unit.providers.calls import call_for, run_test_connection
from worker.providers.openai_compatible import OpenAICompatibleProvider


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVLLM]:
    fake = FakeVLLM()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def tgi() -> AsyncIterator[FakeTGI]:
    fake = FakeTGI()
    await fake.start()
    yield fake
    await fake.close()


def settings(base_url: str, model: str) -> dict[str, str]:
    return {"kind": "openai_compatible", "base_url": base_url, "model": model}


async def test_tgi_gets_its_own_response_format_shape_after_refusing_openais(
    tgi: FakeTGI, session: aiohttp.ClientSession
) -> None:
    config = settings(tgi.base_url, "tgi")
    provider = OpenAICompatibleProvider(OpenAICompatibleSettings.model_validate(config), session)

    first = await provider.complete(call_for("rca", config))
    second = await provider.complete(call_for("rca", config))

    RcaResult.model_validate_json(first.text or "")
    RcaResult.model_validate_json(second.text or "")
    assert [r["response_format"]["type"] for r in tgi.requests] == ["json", "json"]
    assert "probable_causes" in tgi.requests[0]["response_format"]["value"]["properties"]


async def test_windows_come_from_vllm_models_and_tgi_info(
    vllm: FakeVLLM, tgi: FakeTGI, session: aiohttp.ClientSession
) -> None:
    on_vllm = OpenAICompatibleProvider(
        OpenAICompatibleSettings.model_validate(settings(vllm.base_url, vllm.model)), session
    )
    on_tgi = OpenAICompatibleProvider(OpenAICompatibleSettings.model_validate(settings(tgi.base_url, "tgi")), session)

    assert (await on_vllm.describe()).context_window == 131072
    assert (await on_tgi.describe()).context_window == 32768


async def test_vllm_without_auto_tool_choice_is_reported_forced_only_and_ready(
    vllm: FakeVLLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draft = tmp_path / "draft.toml"
    draft.write_text(
        f'tenant_id = "draft"\n[provider]\nkind = "openai_compatible"\nbase_url = "{vllm.base_url}"\n'
        f'model = "{vllm.model}"\n'
    )

    code = await run_test_connection("--config", str(draft), "--json")

    report = ConnectionReport.model_validate_json(capsys.readouterr().out)
    assert code == 0
    assert report.tool_calling == "forced_only"
    assert (report.context_window, report.context_window_source) == (131072, "provider")
    assert report.verdict == "ready"
    [tools] = [c for c in report.checks if c.requirement == "tool_calling"]
    assert "--enable-auto-tool-choice" in (tools.fix or "")

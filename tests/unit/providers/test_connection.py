"""Test Connection from the command line against every provider's fake, and what a message may not ask for."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts import AzureOpenAISettings, BedrockSettings, ConnectionReport, OpenAICompatibleSettings, VertexSettings
from tests.fakes.azure_openai_server import FakeAzureOpenAI
from tests.fakes.fixtures import AWS_SECRET, AZURE_KEY, AwsFakes, VertexFake, provider_toml
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI
from tests.unit.providers.calls import run_test_connection
from worker.connection_check.guard import ConfigRefused, refuse_unsafe_endpoints
from worker.connection_check.probes import check_connection, check_draft_from_message
from worker.providers.bedrock import BedrockProvider
from worker.providers.egress import EgressPolicy, egress_session

DRAFTS = EgressPolicy(drafts=True)
LOCAL_DRAFTS = EgressPolicy.for_drafts(["127.0.0.0/8", "::1/128", "10.0.0.0/8"])


@pytest.fixture
async def fake_openai() -> Any:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.close()


async def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await run_test_connection(*argv)
    return code, capsys.readouterr().out


def draft(tmp_path: Path, kind: str, url: str, **extra: str) -> Path:
    key_file = tmp_path / "vertex-key.json"
    path = tmp_path / "draft.toml"
    path.write_text('tenant_id = "draft"\n' + provider_toml(kind, url, key_file=key_file, **extra))
    return path


@pytest.fixture
def urls(
    fake_azure: FakeAzureOpenAI, fake_aws: AwsFakes, fake_vertex: VertexFake, fake_ollama: FakeOllama, tmp_path: Path
) -> dict[str, str]:
    (tmp_path / "vertex-key.json").write_text(fake_vertex.service_account)
    return {
        "azure_openai": fake_azure.endpoint,
        "bedrock": fake_aws.bedrock.endpoint_url,
        "vertex": fake_vertex.fake.base_url,
        "ollama": fake_ollama.base_url,
    }


@pytest.mark.parametrize(
    ("kind", "context_source"),
    [("azure_openai", "model_table"), ("bedrock", "model_table"), ("vertex", "model_table"), ("ollama", "config")],
)
async def test_draft_that_works_is_ready_and_the_json_report_says_why(
    kind: str,
    context_source: str,
    urls: dict[str, str],
    fake_vertex: VertexFake,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = await run_cli("--config", str(draft(tmp_path, kind, urls[kind])), "--json", capsys=capsys)

    report = ConnectionReport.model_validate_json(out)
    assert code == 0
    assert (report.reachable, report.authenticated, report.model_found) == (True, True, True)
    assert report.tool_calling == "yes"
    assert report.structured_output == "schema"
    assert report.context_window is not None
    assert report.context_window >= 128_000
    assert report.context_window_source == context_source
    assert report.rca_latency_ms is not None
    assert report.latency_ms is not None
    assert report.verdict == "ready", report.checks
    assert report.input_tokens > 0
    for secret in (AZURE_KEY, AWS_SECRET, "PRIVATE KEY", orjson.loads(fake_vertex.service_account)["private_key_id"]):
        assert secret not in out


async def test_stored_tenant_is_reported_for_humans(
    fake_ollama: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "acme.toml").write_text('tenant_id = "acme"\n' + provider_toml("ollama", fake_ollama.base_url))

    code, out = await run_cli("--tenant", "acme", "--tenants", str(tenants), capsys=capsys)

    assert code == 0
    assert "Verdict: READY" in out
    assert "tool calling       yes" in out
    assert "context window     131,072 tokens (from the tenant config)" in out


async def test_openai_compatible_without_a_known_window_is_ready_with_a_warning(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEST_FAKE_OPENAI_KEY", "sk-test-fake")
    path = tmp_path / "draft.toml"
    path.write_text(
        f'tenant_id = "draft"\n[provider]\nkind = "openai_compatible"\nbase_url = "{fake_openai.base_url}"\n'
        'model = "fake-model"\n'
        'api_key = "env:TEST_FAKE_OPENAI_KEY"\n'
    )

    code, out = await run_cli("--config", str(path), capsys=capsys)

    assert code == 0
    assert "Verdict: READY WITH WARNINGS" in out
    assert "warn  context_window" in out
    assert "fix: set provider.context_window" in out
    assert "sk-test-fake" not in out


async def test_wrong_azure_key_is_not_ready_and_says_what_to_fix_without_echoing_it(
    urls: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEST_AZURE_KEY", "wrong-key-1234")

    code, out = await run_cli("--config", str(draft(tmp_path, "azure_openai", urls["azure_openai"])), capsys=capsys)

    assert code == 1
    assert "Verdict: NOT READY" in out
    assert "authenticated      NO" in out
    assert "401 from Azure OpenAI" in out
    assert "fix: check api_key" in out
    assert "wrong-key-1234" not in out


async def test_titan_cannot_serve_runbooks_and_its_window_is_too_small(
    urls: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = draft(tmp_path, "bedrock", urls["bedrock"], model_id='"amazon.titan-text-express-v1"')

    code, out = await run_cli("--config", str(path), "--json", capsys=capsys)

    report = ConnectionReport.model_validate_json(out)
    assert code == 1
    assert report.tool_calling == "no"
    assert report.structured_output == "none"
    assert report.context_window == 8192
    failed = {c.requirement: c for c in report.checks if c.status == "fail"}
    assert set(failed) == {"tool_calling", "context_window"}
    assert "Claude 3+" in (failed["tool_calling"].fix or "")


async def test_ollama_model_without_tools_capability_is_reported(
    urls: dict[str, str], fake_ollama: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_ollama.capabilities = ["completion"]

    code, out = await run_cli("--config", str(draft(tmp_path, "ollama", urls["ollama"])), "--json", capsys=capsys)

    assert code == 1
    assert ConnectionReport.model_validate_json(out).tool_calling == "no"


async def test_unreachable_endpoint_says_check_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    code, out = await run_cli("--config", str(draft(tmp_path, "ollama", url)), "--json", capsys=capsys)

    report = ConnectionReport.model_validate_json(out)
    assert code == 1
    assert report.reachable is False
    assert "check the endpoint URL" in (report.checks[0].fix or "")


def test_invalid_draft_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "draft.toml"
    path.write_text(
        'tenant_id = "draft"\n[provider]\nkind = "azure_openai"\nendpoint = "https://x/"\ndeployment = "d"\n'
        'api_key = "env:K"\n'
        'api_version = "2023-05-15"\n'
    )

    done = subprocess.run(
        [sys.executable, "-m", "worker", "test-connection", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert "provider.api_version" in done.stderr
    assert "older than 2024-02-15-preview" in done.stderr


# --- what a configuration carried in a message may not do ----------------------------------------------------


async def test_message_config_with_secret_reference_is_refused() -> None:
    settings = AzureOpenAISettings.model_validate(
        {"kind": "azure_openai", "endpoint": "http://127.0.0.1:1/", "deployment": "d", "api_key": "env:HOME"}
    )

    with pytest.raises(ConfigRefused) as caught:
        await check_draft_from_message(settings, DRAFTS)

    assert caught.value.code == "secret_reference_refused"
    assert "provider.api_key" in caught.value.message


async def test_message_config_assuming_a_role_with_the_workers_own_identity_is_refused() -> None:
    settings = BedrockSettings.model_validate(
        {"kind": "bedrock", "region": "eu-central-1", "model_id": "m", "role_arn": "arn:aws:iam::123456789012:role/r"}
    )

    with pytest.raises(ConfigRefused) as caught:
        await check_draft_from_message(settings, DRAFTS)

    assert "worker's own AWS identity" in caught.value.message


@pytest.mark.parametrize(
    "settings",
    [
        OpenAICompatibleSettings(kind="openai_compatible", base_url="http://169.254.169.254/latest/v1", model="m"),
        OpenAICompatibleSettings(kind="openai_compatible", base_url="http://[fe80::1]:8000/v1", model="m"),
        OpenAICompatibleSettings(kind="openai_compatible", base_url="http://2852039166/v1", model="m"),
        OpenAICompatibleSettings(kind="openai_compatible", base_url="http://metadata.google.internal/v1", model="m"),
        # Refused by the tenant-config validator already; the draft check refuses it too, should one slip past.
        OpenAICompatibleSettings.model_construct(kind="openai_compatible", base_url="file:///etc/passwd", model="m"),
        BedrockSettings.model_validate(
            {
                "kind": "bedrock",
                "region": "eu-central-1",
                "model_id": "m",
                "role_arn": "arn:aws:iam::123456789012:role/r",
                "endpoint_url": "http://127.0.0.1:1",
                "sts_endpoint_url": "http://169.254.170.2/",
            }
        ),
        VertexSettings.model_validate(
            {
                "kind": "vertex",
                "project": "p",
                "location": "l",
                "model": "gemini-2.5-flash",
                "base_url": "http://127.0.0.1:1",
                "service_account": '{"token_uri": "http://169.254.169.254/token"}',
            }
        ),
    ],
    ids=["metadata-ip", "link-local-v6", "metadata-as-decimal", "metadata-name", "not-http", "sts", "token-uri"],
)
async def test_message_config_reaching_link_local_or_metadata_is_refused(settings: Any) -> None:
    with pytest.raises(ConfigRefused) as caught:
        await refuse_unsafe_endpoints(settings, LOCAL_DRAFTS)  # allowed private ranges do not open metadata

    assert caught.value.code == "endpoint_refused"


async def test_loopback_and_private_draft_endpoints_need_the_operators_allowance() -> None:
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:11434", "http://10.1.2.3:8000/v1"):
        settings = OpenAICompatibleSettings(kind="openai_compatible", base_url=url, model="m")
        with pytest.raises(ConfigRefused) as caught:
            await refuse_unsafe_endpoints(settings, DRAFTS)
        assert caught.value.code == "endpoint_refused"
        await refuse_unsafe_endpoints(settings, LOCAL_DRAFTS)


async def test_configuration_the_sdk_refuses_is_reported_not_crashed() -> None:
    settings = BedrockSettings.model_validate(
        {
            "kind": "bedrock",
            "region": "eu-central-1",
            "model_id": "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": "example-secret",
            "endpoint_url": "http://bad_host name:1",
        }
    )

    async with egress_session(EgressPolicy()) as session:
        report = await check_connection(settings, lambda _: BedrockProvider(settings, session))

    assert report.verdict == "not_ready"
    assert report.reachable is False
    assert "example-secret" not in report.model_dump_json()


# --- the truth about what was tried, and nothing secret in what is said -------------------------------------


async def test_unset_variable_is_its_own_failed_check_and_nothing_is_called(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ATLAS_TEST_UNSET_KEY", raising=False)
    path = tmp_path / "draft.toml"
    path.write_text(
        'tenant_id = "draft"\n'
        + provider_toml("openai_compatible", fake_openai.base_url, api_key='"env:ATLAS_TEST_UNSET_KEY"')
    )

    code, out = await run_cli("--config", str(path), "--json", capsys=capsys)

    report = ConnectionReport.model_validate_json(out)
    assert code == 1
    assert report.reachable is False
    assert report.authenticated is None  # not claimed either way: the key was never sent
    assert report.verdict == "not_ready"
    [check] = report.checks
    assert (check.requirement, check.status) == ("secrets", "fail")
    assert "ATLAS_TEST_UNSET_KEY" in check.message
    assert "environment variable ATLAS_TEST_UNSET_KEY" in (check.fix or "")
    assert "test-connection resolves env: and file: secrets from its own environment" in (check.fix or "")
    assert fake_openai.requests == []


async def test_missing_service_account_file_is_named_and_reachable_is_not_claimed(
    urls: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone" / "sa.json"
    path = tmp_path / "draft.toml"
    path.write_text('tenant_id = "draft"\n' + provider_toml("vertex", urls["vertex"], key_file=missing))

    code, out = await run_cli("--config", str(path), capsys=capsys)

    assert code == 1
    assert "reachable          NO" in out
    assert "fail  secrets" in out
    assert f"fix: make file {missing} available" in out


async def test_a_401_that_quotes_the_key_is_reported_without_it(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_openai.quote_refused_key = True
    monkeypatch.setenv("ATLAS_TEST_WRONG_KEY", "zq8-opaque-wrong-value")  # no shape a pattern would know
    path = tmp_path / "draft.toml"
    path.write_text(
        'tenant_id = "draft"\n'
        + provider_toml("openai_compatible", fake_openai.base_url, api_key='"env:ATLAS_TEST_WRONG_KEY"')
    )

    code, out = await run_cli("--config", str(path), "--json", capsys=capsys)

    report = ConnectionReport.model_validate_json(out)
    assert code == 1
    assert (report.reachable, report.authenticated) == (True, False)  # it answered, and refused the key
    assert "Incorrect API key provided: ***" in report.checks[0].message
    assert "zq8-opaque-wrong-value" not in out


@pytest.mark.parametrize(
    ("userinfo", "query", "secrets"),
    [("svc:pa55-in-url@", "", ("pa55-in-url",)), ("", "?api-key=qk-in-url-77", ("qk-in-url-77",))],
)
async def test_credentials_in_the_endpoint_url_are_not_in_the_report(
    userinfo: str,
    query: str,
    secrets: tuple[str, ...],
    fake_ollama: FakeOllama,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = fake_ollama.base_url.replace("://", f"://{userinfo}") + query
    path = tmp_path / "draft.toml"
    path.write_text('tenant_id = "draft"\n' + provider_toml("ollama", url))

    _, out = await run_cli("--config", str(path), capsys=capsys)

    assert "Test Connection: ollama llama3.1:8b at http://" in out
    for secret in secrets:
        assert secret not in out


async def test_a_password_in_the_url_and_an_api_key_together_are_a_named_conflict_not_a_crash(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ATLAS_TEST_KEY", "sk-test-fake")
    url = fake_openai.base_url.replace("://", "://svc:pa55-in-url@")
    path = tmp_path / "draft.toml"
    path.write_text('tenant_id = "draft"\n' + provider_toml("openai_compatible", url, api_key='"env:ATLAS_TEST_KEY"'))

    code, out = await run_cli("--config", str(path), "--json", capsys=capsys)

    report = ConnectionReport.model_validate_json(out)
    assert code == 1
    assert (report.reachable, report.verdict) == (False, "not_ready")
    [check] = report.checks
    assert "credentials in its URL and an api_key" in check.message
    assert "pa55-in-url" not in out
    assert fake_openai.requests == []

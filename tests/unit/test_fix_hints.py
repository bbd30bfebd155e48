"""Every failed Test Connection check names what to fix for its own cause: the failure → hint table."""

from pathlib import Path

import pytest
from pydantic import SecretStr

from worker.connection_check.requirements import FIX_BY_CLASS, FIX_BY_CODE, fix_for
from worker.errors import ErrorClass, ProviderError
from worker.providers.http import classify_status
from worker.secrets import SecretUnresolved, resolve_secret


def unresolved(reference: str) -> SecretUnresolved:
    with pytest.raises(SecretUnresolved) as caught:
        resolve_secret(SecretStr(reference))
    return caught.value


def error(code: str, error_class: ErrorClass = ErrorClass.BAD_REQUEST) -> ProviderError:
    return ProviderError(error_class, "message", code=code)


def http(status: int, text: str = "denied") -> ProviderError:
    return classify_status(status, text, {}, "the server")


# (provider kind, the failure, a phrase the hint must hold, a phrase that would name another cause)
CASES: list[tuple[str, ProviderError, str, str]] = [
    (
        "openai_compatible",
        unresolved("env:ATLAS_TEST_NEVER_SET"),
        "environment variable ATLAS_TEST_NEVER_SET",
        "--api-key",
    ),
    ("vertex", unresolved("file:/nonexistent/sa.json"), "file /nonexistent/sa.json", "Vertex AI User"),
    ("bedrock", error("secret_unresolved", ErrorClass.CONFIG), "set access_key_id and secret_access_key", "check"),
    ("ollama", error("unreachable", ErrorClass.TRANSIENT), "check the endpoint URL", "timeout"),
    ("ollama", error("timeout", ErrorClass.TRANSIENT), "longer timeout_s", "URL"),
    ("vertex", error("service_account_invalid", ErrorClass.AUTH), "whole service-account JSON key", "role"),
    ("bedrock", error("assume_role_failed", ErrorClass.AUTH), "trust policy", "InvokeModel"),
    ("vertex", error("config_invalid"), "as the message says", "credentials"),
    ("vertex", error("model_retired"), "use a current model", "location"),
    ("openai_compatible", error("provider_unsupported"), "provider.kind", "api_key"),
    ("azure_openai", http(403), "network rules", "api_key"),
    ("bedrock", error("forbidden", ErrorClass.AUTH), "bedrock:InvokeModel", "secret_access_key"),
    ("vertex", http(403), "Vertex AI User role", "deleted"),
    ("openai_compatible", http(403), "lack permission", "--api-key"),
    ("bedrock", error("inference_profile_required"), "inference profile", "region"),
    ("openai_compatible", error("malformed_response", ErrorClass.TRANSIENT), "provider.kind", "credentials"),
    ("openai_compatible", http(503), "failing on its side", "URL"),
    ("azure_openai", error("content_filtered", ErrorClass.CONTENT_FILTERED), "content filter", "api_key"),
    ("azure_openai", http(401), "check api_key (Azure portal", "network rules"),
    ("bedrock", http(401), "check access_key_id / secret_access_key", "InvokeModel"),
    ("vertex", http(401), "check service_account", "Vertex AI User"),
    ("openai_compatible", http(401), "the server's --api-key", "environment"),
    ("ollama", http(401), "proxy in front of it", "api_key"),
    ("azure_openai", http(404), "deployment name, not the model name", "api_key"),
    ("bedrock", error("model_not_found", ErrorClass.NOT_FOUND), "model access is enabled", "credentials"),
    ("vertex", http(404), "location", "credentials"),
    ("openai_compatible", http(404), "GET /v1/models", "credentials"),
    ("ollama", http(404), "ollama pull", "credentials"),
    ("openai_compatible", http(429, "slow down"), "throttling", "quota"),
    ("openai_compatible", http(429, "insufficient_quota"), "quota or billing", "throttling"),
    ("openai_compatible", http(400, "maximum context length is 8192"), "larger model", "api_version"),
    ("openai_compatible", http(400, "Invalid value for 'temperature'"), "rejected the probe", "credentials"),
    ("openai_compatible", error("transient_other", ErrorClass.TRANSIENT), "test again", "credentials"),
]


@pytest.mark.parametrize(("kind", "failure", "says", "not_about"), CASES)
def test_each_failure_gets_the_hint_for_its_own_cause(
    kind: str, failure: ProviderError, says: str, not_about: str
) -> None:
    hint = fix_for(kind, failure)
    assert says in hint
    assert not_about not in hint


def test_an_unresolvable_secret_says_test_connection_resolves_from_its_own_environment() -> None:
    hint = fix_for("azure_openai", unresolved("env:ATLAS_TEST_NEVER_SET"))
    assert "test-connection resolves env: and file: secrets from its own environment" in hint
    assert "api_key (Azure portal" not in hint  # the key may be right; it was never read


def test_every_entry_of_the_table_has_a_case() -> None:
    covered_codes = {failure.code for _, failure, _, _ in CASES}
    assert set(FIX_BY_CODE) <= covered_codes
    assert set(FIX_BY_CLASS) <= {failure.error_class for _, failure, _, _ in CASES if failure.code not in FIX_BY_CODE}
    kinds = {kind for kind, failure, _, _ in CASES if failure.code in ("unauthorized",)}
    assert kinds == {"azure_openai", "bedrock", "vertex", "openai_compatible", "ollama"}


def test_a_file_reference_is_named_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "key.json"
    assert f"file {missing}" in fix_for("vertex", unresolved(f"file:{missing}"))

"""Azure OpenAI: Chat Completions on a deployment URL with a dated `api-version` and an `api-key` header."""

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from contracts import AzureOpenAISettings
from contracts.tenant import OLDEST_AZURE_API_VERSION, azure_api_version_key
from worker.errors import ErrorClass, ProviderError
from worker.providers.base import ModelCall, ModelResult, StructuredOutputMode
from worker.providers.chat_completions import chat_body, parse_chat_response
from worker.providers.http import classify_status, error_text, json_object, send_json
from worker.redaction import redact_url
from worker.secrets import resolve_secret

JSON_SCHEMA_SINCE = "2024-08-01-preview"  # older versions answer 400 to response_format json_schema
MAX_COMPLETION_TOKENS_SINCE = "2024-09-01-preview"  # o-series deployments reject max_tokens


def _at_least(version: str, floor: str) -> bool:
    key, floor_key = azure_api_version_key(version), azure_api_version_key(floor)
    return key is not None and floor_key is not None and key >= floor_key


def classify_azure(status: int, payload: bytes, headers: Mapping[str, str], who: str) -> ProviderError:
    """Azure's error body is OpenAI's plus `innererror`; content filtering and deployments get their own words."""
    found = json_object(payload).get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    code = str(error.get("code") or "")
    inner: dict[str, Any] = error["innererror"] if isinstance(error.get("innererror"), dict) else {}
    text = error_text(payload)
    if code == "content_filter" or inner.get("code") == "ResponsibleAIPolicyViolation":
        flagged = _filtered_categories(inner.get("content_filter_result"))
        return ProviderError(
            ErrorClass.CONTENT_FILTERED,
            f"{status} from {who}: Azure's content filter blocked the prompt"
            + (f" ({', '.join(flagged)})" if flagged else ""),
            code="content_filtered",
            status=status,
        )
    if status == 404 or code == "DeploymentNotFound":
        return ProviderError(
            ErrorClass.NOT_FOUND,
            f"404 from {who}: check the deployment name and the endpoint "
            f"(a new deployment can take a few minutes to appear) ({text})",
            code="deployment_not_found",
            status=status,
        )
    if status == 400 and ("api-version" in text.lower() or "api version" in text.lower()):
        return ProviderError(
            ErrorClass.BAD_REQUEST,
            f"400 from {who}: the api-version does not support this request; check api_version ({text})",
            code="api_version_unsupported",
            status=status,
        )
    if status == 401:
        return ProviderError(
            ErrorClass.AUTH, f"401 from {who}: check the API key ({text})", code="unauthorized", status=status
        )
    return classify_status(status, text, headers, who)


def _filtered_categories(result: Any) -> list[str]:
    if not isinstance(result, dict):
        return []
    return sorted(name for name, verdict in result.items() if isinstance(verdict, dict) and verdict.get("filtered"))


def endpoints(settings: AzureOpenAISettings) -> list[str]:
    """The resource endpoint; the deployment's chat URL lies under it."""
    return [settings.endpoint]


def chat_url(settings: AzureOpenAISettings) -> str:
    return (
        f"{settings.endpoint.rstrip('/')}/openai/deployments/{quote(settings.deployment, safe='')}/chat/completions"
        f"?api-version={quote(settings.api_version, safe='')}"
    )


class AzureOpenAIProvider:
    """Calls `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=…`."""

    kind = "azure_openai"

    def __init__(self, settings: AzureOpenAISettings, session: aiohttp.ClientSession) -> None:
        if not _at_least(settings.api_version, OLDEST_AZURE_API_VERSION):
            # The contract already refuses this; a provider built from unvalidated data must refuse it too.
            raise ProviderError(
                ErrorClass.BAD_REQUEST,
                f"api_version {settings.api_version} is older than {OLDEST_AZURE_API_VERSION}; use e.g. 2024-10-21",
                code="config_invalid",
            )
        self._settings = settings
        self._session = session
        self._url = chat_url(settings)
        self._who = f"Azure OpenAI ({urlsplit(settings.endpoint).hostname}, deployment {settings.deployment})"

    @property
    def endpoint(self) -> str:
        return redact_url(self._settings.endpoint)

    @property
    def model(self) -> str:
        return self._settings.deployment

    async def aclose(self) -> None:
        """Nothing of its own to release: connections belong to the shared session."""

    @property
    def structured_output(self) -> StructuredOutputMode:
        return "schema" if _at_least(self._settings.api_version, JSON_SCHEMA_SINCE) else "json_mode"

    def body(self, call: ModelCall) -> dict[str, Any]:
        body = chat_body(call)
        version = self._settings.api_version
        if _at_least(version, MAX_COMPLETION_TOKENS_SINCE):
            body["max_completion_tokens"] = body.pop("max_tokens")
        if call.output_schema is not None and not _at_least(version, JSON_SCHEMA_SINCE):
            # JSON mode keeps the answer parseable; the schema itself then has to travel in the prompt.
            body["response_format"] = {"type": "json_object"}
            schema = orjson.dumps(call.output_schema.schema).decode()
            body["messages"][0]["content"] += f"\n\nReply with one JSON object matching this JSON Schema:\n{schema}"
        return body

    async def complete(self, call: ModelCall) -> ModelResult:
        headers = {"api-key": resolve_secret(self._settings.api_key)}
        data = await send_json(
            self._session,
            "POST",
            self._url,
            body=self.body(call),
            headers=headers,
            who=self._who,
            classify=classify_azure,
        )
        return parse_chat_response(data, self._who)

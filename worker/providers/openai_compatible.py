"""OpenAI Chat Completions over HTTP: vLLM, TGI, Ollama's `/v1`, OpenAI itself (and Azure's body)."""

from typing import Any

import aiohttp

from contracts import OpenAICompatibleSettings
from worker.errors import ProviderError
from worker.providers.base import ModelCall, ModelInfo, ModelResult
from worker.providers.chat_completions import chat_body, parse_chat_response
from worker.providers.http import send_json
from worker.redaction import redact_url
from worker.secrets import resolve_secret


def tgi_response_format(body: dict[str, Any]) -> dict[str, Any]:
    """TGI's own grammar shape (`type` + `value`) for the schema OpenAI's shape carries."""
    schema = body["response_format"]["json_schema"]["schema"]
    return body | {"response_format": {"type": "json", "value": schema}}


def rejects_openai_response_format(error: ProviderError) -> bool:
    # TGI cannot deserialize OpenAI's `json_schema` shape: 422 "... response_format: missing field `value`".
    return error.status == 422 and "response_format" in error.message


def endpoints(settings: OpenAICompatibleSettings) -> list[str]:
    """Every URL a call or a description may reach: all of them lie under the base URL."""
    return [settings.base_url]


def chat_url(settings: OpenAICompatibleSettings) -> str:
    return settings.base_url.rstrip("/") + "/chat/completions"


class OpenAICompatibleProvider:
    """Calls `{base_url}/chat/completions` with an optional bearer key."""

    kind = "openai_compatible"

    def __init__(self, settings: OpenAICompatibleSettings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self._url = chat_url(settings)
        self._tgi_grammar = False  # learned from the server's first refusal of OpenAI's response_format

    @property
    def endpoint(self) -> str:
        return redact_url(self._settings.base_url)

    @property
    def model(self) -> str:
        return self._settings.model

    async def aclose(self) -> None:
        """Nothing of its own to release: connections belong to the shared session."""

    @property
    def _who(self) -> str:
        return f"the OpenAI-compatible server at {self._settings.base_url}"

    def _headers(self) -> dict[str, str]:
        if self._settings.api_key is None:
            return {}
        return {"Authorization": f"Bearer {resolve_secret(self._settings.api_key)}"}

    async def complete(self, call: ModelCall) -> ModelResult:
        headers = self._headers()
        body = chat_body(call) | {"model": self._settings.model}
        if call.output_schema is not None and self._tgi_grammar:
            body = tgi_response_format(body)
        try:
            data = await self._post(body, headers)
        except ProviderError as exc:
            if call.output_schema is None or self._tgi_grammar or not rejects_openai_response_format(exc):
                raise
            self._tgi_grammar = True
            data = await self._post(tgi_response_format(body), headers)
        return parse_chat_response(data, self._who)

    async def _post(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        return await send_json(self._session, "POST", self._url, who=self._who, body=body, headers=headers)

    async def describe(self) -> ModelInfo:
        """vLLM lists `max_model_len` under /v1/models; TGI reports `max_total_tokens` under /info."""
        base = self._settings.base_url.rstrip("/")
        listing = await send_json(self._session, "GET", f"{base}/models", headers=self._headers(), who=self._who)
        entries = [m for m in listing.get("data") or [] if isinstance(m, dict)]
        entry = next((m for m in entries if m.get("id") == self._settings.model), None)
        if entry is not None and isinstance(entry.get("max_model_len"), int):
            return ModelInfo(
                found=True, context_window=entry["max_model_len"], context_source="/v1/models max_model_len"
            )
        root = base.removesuffix("/v1")
        try:
            info = await send_json(self._session, "GET", f"{root}/info", who=self._who)
        except ProviderError:
            return ModelInfo(found=entry is not None or None)
        total = info.get("max_total_tokens") if isinstance(info, dict) else None
        if isinstance(total, int):
            return ModelInfo(found=True, context_window=total, context_source="/info max_total_tokens")
        return ModelInfo(found=entry is not None or None)

"""Tenant configuration: one TOML file per tenant naming its provider, fallback policy and limits."""

import re
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ._base import TENANT_ID_PATTERN

SECRET_DESCRIPTION = "A reference: `env:NAME` or `file:/path`. Never logged."
OLDEST_AZURE_API_VERSION = "2024-02-15-preview"
# The product's floor: an RCA prompt with the incident's evidence does not fit in less.
MIN_CONTEXT_WINDOW = 32_768
ROLE_ARN_PATTERN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
# Google retired the PaLM 2 models on Vertex AI; a tenant naming one would fail on every call.
RETIRED_VERTEX_MODELS = re.compile(r"(text|chat|code|codechat)-(bison|unicorn|gecko)|textembedding-gecko")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The value is not quoted: a URL with a typo may still hold a `user:password@`.
        raise ValueError("is not an http(s) URL with a host, e.g. https://host/v1")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]


def azure_api_version_key(version: str) -> tuple[str, int] | None:
    """Sort key of a dated Azure OpenAI api-version (a preview sorts before the GA of the same date)."""
    date, _, suffix = version.partition("-preview")
    if len(date) != 10 or date[4] != "-" or date[7] != "-" or not date.replace("-", "").isdigit() or suffix:
        return None
    return date, 0 if version.endswith("-preview") else 1


class _Section(BaseModel):
    # Unknown keys are errors: a misspelled `[fallbak]` or `apikey` must not silently become a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ProviderBase(_Section):
    context_window: int | None = Field(
        default=None,
        ge=MIN_CONTEXT_WINDOW,
        description="The model's context window in tokens, if known; at least 32768, which the product needs.",
    )


class OpenAICompatibleSettings(_ProviderBase):
    """Any server speaking OpenAI Chat Completions: vLLM, TGI, Ollama's /v1, OpenAI itself."""

    kind: Literal["openai_compatible"]
    base_url: HttpUrl = Field(description="Up to and including `/v1`, e.g. http://vllm:8000/v1")
    model: str
    api_key: SecretStr | None = Field(default=None, description=SECRET_DESCRIPTION)


class AzureOpenAISettings(_ProviderBase):
    """An Azure OpenAI deployment (dated api-version endpoint)."""

    kind: Literal["azure_openai"]
    endpoint: HttpUrl = Field(description="https://<resource>.openai.azure.com/")
    deployment: str
    api_version: str = Field(default="2024-10-21", description=f"A dated version, {OLDEST_AZURE_API_VERSION} or newer.")
    api_key: SecretStr = Field(description=SECRET_DESCRIPTION)

    @field_validator("api_version")
    @classmethod
    def _supported_api_version(cls, value: str) -> str:
        key = azure_api_version_key(value)
        if key is None:
            raise ValueError(f"{value!r} is not a dated api-version such as 2024-10-21")
        if key < (azure_api_version_key(OLDEST_AZURE_API_VERSION) or key):
            raise ValueError(
                f"api-version {value} is older than {OLDEST_AZURE_API_VERSION}, the oldest this worker supports; "
                "use a newer one, e.g. 2024-10-21"
            )
        return value


class BedrockSettings(_ProviderBase):
    """AWS Bedrock Runtime through the Converse API."""

    kind: Literal["bedrock"]
    region: str
    model_id: str = Field(description="Base model id, inference profile id or ARN.")
    access_key_id: SecretStr | None = Field(default=None, description=SECRET_DESCRIPTION)
    secret_access_key: SecretStr | None = Field(default=None, description=SECRET_DESCRIPTION)
    role_arn: str | None = Field(
        default=None,
        description="A role to assume; with access keys, the keys sign the AssumeRole call and the role's "
        "credentials sign every Bedrock call.",
    )
    external_id: SecretStr | None = Field(default=None, description=SECRET_DESCRIPTION)
    endpoint_url: HttpUrl | None = None
    sts_endpoint_url: HttpUrl | None = None

    @field_validator("role_arn")
    @classmethod
    def _role_arn_shape(cls, value: str | None) -> str | None:
        if value is not None and not ROLE_ARN_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not an IAM role ARN such as arn:aws:iam::123456789012:role/name")
        return value

    @model_validator(mode="after")
    def _whole_key_pair(self) -> "BedrockSettings":
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together: give both, or neither")
        return self


class VertexSettings(_ProviderBase):
    """Google Vertex AI Gemini `generateContent` with a service-account key."""

    kind: Literal["vertex"]
    project: str
    location: str
    model: str
    service_account: SecretStr = Field(description="Reference to the service account's JSON key.")
    base_url: HttpUrl | None = Field(default=None, description="Private endpoint, instead of the public host.")

    @field_validator("model")
    @classmethod
    def _not_retired(cls, value: str) -> str:
        if RETIRED_VERTEX_MODELS.match(value):
            raise ValueError(
                f"{value} is a PaLM model, retired by Google in April 2025; use a Gemini model such as gemini-2.5-flash"
            )
        return value


class OllamaSettings(_ProviderBase):
    """Ollama's native `/api/chat`."""

    kind: Literal["ollama"]
    base_url: HttpUrl = "http://127.0.0.1:11434"
    model: str


ProviderSettings = Annotated[
    OpenAICompatibleSettings | AzureOpenAISettings | BedrockSettings | VertexSettings | OllamaSettings,
    Field(discriminator="kind"),
]


class FallbackPolicy(StrEnum):
    """What happens when the tenant's provider fails."""

    FAIL_CLOSED = "fail_closed"
    QUEUE_AND_RETRY = "queue_and_retry"
    ATLAS_CLOUD = "atlas_cloud"


class Fallback(_Section):
    policy: FallbackPolicy = FallbackPolicy.FAIL_CLOSED
    max_attempts: int = Field(default=5, ge=1, le=50)


class Limits(_Section):
    timeout_s: float = Field(default=30.0, gt=0, le=1500, description="Per provider call.")
    max_concurrency: int = Field(default=16, ge=1, le=10_000, description="Calls in flight per worker.")


class Pricing(_Section):
    """Optional price table, to estimate a cost per reply."""

    currency: str = "USD"
    input_per_1k_tokens: float = Field(ge=0)
    output_per_1k_tokens: float = Field(ge=0)


class TenantConfig(_Section):
    """One tenant's bring-your-own-LLM configuration (`tenants/<tenant_id>.toml`)."""

    tenant_id: str = Field(pattern=TENANT_ID_PATTERN)
    provider: ProviderSettings
    fallback: Fallback = Field(default_factory=Fallback)
    limits: Limits = Field(default_factory=Limits)
    pricing: Pricing | None = None

"""Model calls for provider tests, built from the sample incident exactly as the handler builds them."""

from typing import Any

from contracts import InferenceRequest, TenantConfig
from tests import samples
from worker.prompts import build_call
from worker.providers.base import ModelCall


def call_for(task: str, provider: dict[str, Any], **fields: Any) -> ModelCall:
    tenant = TenantConfig.model_validate({"tenant_id": "acme", "provider": provider, "limits": {"timeout_s": 2}})
    request = InferenceRequest.model_validate(samples.request("acme", task, **fields))
    return build_call(request, tenant).call

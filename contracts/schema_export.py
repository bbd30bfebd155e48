"""Writes the JSON Schema of each contract into `contracts/schemas/` (`python -m contracts.schema_export`)."""

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from .messages import InferenceReply, InferenceRequest
from .rca import RcaResult
from .tenant import TenantConfig

SCHEMA_DIR = Path(__file__).parent / "schemas"
EXPORTED: dict[str, type[BaseModel]] = {
    "inference_request.schema.json": InferenceRequest,
    "inference_reply.schema.json": InferenceReply,
    "rca_result.schema.json": RcaResult,
    "tenant_config.schema.json": TenantConfig,
}


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[str, str]:
    return {name: render(model) for name, model in EXPORTED.items()}


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (SCHEMA_DIR / name).write_text(text)
        print(f"wrote {SCHEMA_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

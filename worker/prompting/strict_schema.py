"""The JSON Schema sent to providers for structured output: a portable, strict-mode-friendly variant of a contract.

OpenAI's strict mode wants every object closed (`additionalProperties: false`) and every property listed in
`required`; Gemini, Ollama's grammar and Bedrock tool schemas accept a common subset of JSON Schema. So the
provider schema is the contract's pydantic schema with `$ref`s inlined and only portable keywords kept. Value
limits (lengths, bounds, item counts) stay in the field descriptions for the model and are enforced when the
answer is validated against the contract itself.
"""

from typing import Any

from pydantic import BaseModel

PORTABLE_KEYWORDS = frozenset({"type", "properties", "required", "items", "enum", "anyOf", "description"})


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    definitions: dict[str, Any] = schema.pop("$defs", {})
    strict: dict[str, Any] = _strict(_inline(schema, definitions))
    return strict


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        merged = definitions[name] | {k: v for k, v in node.items() if k != "$ref"}
        return _inline(merged, definitions)
    return {key: _inline(value, definitions) for key, value in node.items()}


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in PORTABLE_KEYWORDS:
            continue
        if key == "properties":
            out[key] = {name: _strict(prop) for name, prop in value.items()}
        elif key == "items":
            out[key] = _strict(value)
        elif key == "anyOf":
            out[key] = [_strict(option) for option in value]
        else:
            out[key] = value
    if out.get("type") == "object":
        out["required"] = list(out.get("properties", {}))
        out["additionalProperties"] = False
    return out

"""Sample requests built from the demo incidents."""

import uuid
from pathlib import Path
from typing import Any

import orjson

INCIDENTS = Path(__file__).parent.parent / "demo" / "incidents"


def incident(name: str = "db-pool-exhaustion") -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((INCIDENTS / f"{name}.json").read_bytes())
    return data


def request(tenant_id: str = "acme", task: str = "summary", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 1,
        "request_id": fields.pop("request_id", f"req-{uuid.uuid4().hex[:12]}"),
        "tenant_id": tenant_id,
        "task": task,
        "incident": incident(),
    }
    return body | fields

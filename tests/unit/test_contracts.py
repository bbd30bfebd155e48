"""Contracts: unknown fields are ignored, missing required fields are clear errors, schemas are current."""

import pytest
from pydantic import ValidationError

from contracts import InferenceReply, InferenceRequest, Task
from contracts.schema_export import SCHEMA_DIR, rendered
from tests import samples


def test_unknown_fields_are_ignored_so_publishers_can_upgrade_first() -> None:
    body = samples.request("acme", "summary") | {"new_field_from_the_future": {"x": 1}}
    body["incident"] = body["incident"] | {"runbook_url": "https://wiki/x"}

    request = InferenceRequest.model_validate(body)

    assert request.task is Task.SUMMARY
    assert "new_field_from_the_future" not in request.model_dump()


def test_missing_required_field_names_the_field() -> None:
    body = samples.request("acme", "summary")
    del body["request_id"]

    with pytest.raises(ValidationError) as caught:
        InferenceRequest.model_validate(body)

    assert caught.value.errors()[0]["loc"] == ("request_id",)
    assert caught.value.errors()[0]["type"] == "missing"


@pytest.mark.parametrize("task", ["rca", "runbook", "summary"])
def test_incident_tasks_need_an_incident(task: str) -> None:
    body = samples.request("acme", task)
    del body["incident"]

    with pytest.raises(ValidationError, match="needs an 'incident'"):
        InferenceRequest.model_validate(body)


def test_chat_needs_messages_and_deadline_needs_an_offset() -> None:
    with pytest.raises(ValidationError, match="needs a non-empty 'messages'"):
        InferenceRequest.model_validate({"request_id": "r", "tenant_id": "acme", "task": "chat"})
    with pytest.raises(ValidationError, match="UTC offset"):
        InferenceRequest.model_validate(samples.request("acme", deadline="2030-01-01T00:00:00"))


def test_tenant_id_cannot_break_the_reply_routing_key() -> None:
    with pytest.raises(ValidationError, match="tenant_id"):
        InferenceRequest.model_validate(samples.request("acme.evil"))


def test_reply_round_trips_through_json() -> None:
    reply = InferenceReply.model_validate(
        {
            "request_id": "r1",
            "tenant_id": "acme",
            "task": "summary",
            "status": "ok",
            "result": {"text": "fine"},
            "timings": {"received_at": "2026-01-01T00:00:00Z", "replied_at": "2026-01-01T00:00:01Z"},
        }
    )
    assert InferenceReply.model_validate_json(reply.model_dump_json()) == reply


def test_committed_json_schemas_are_current() -> None:
    stale = [
        name
        for name, text in rendered().items()
        if not (SCHEMA_DIR / name).exists() or (SCHEMA_DIR / name).read_text() != text
    ]
    assert stale == [], f"run `make schemas` to regenerate {stale}"


def test_contracts_never_import_worker() -> None:
    from pathlib import Path

    sources = Path(SCHEMA_DIR).parent.glob("*.py")
    offenders = [p.name for p in sources if "import worker" in p.read_text() or "from worker" in p.read_text()]
    assert offenders == []

"""The default automation actions offered to the model for `runbook` when a request declares none."""

from .messages import ToolDeclaration


def _object(properties: dict[str, dict[str, object]], required: list[str]) -> dict[str, object]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


DEFAULT_RUNBOOK_TOOLS: tuple[ToolDeclaration, ...] = (
    ToolDeclaration(
        name="run_diagnostic",
        description="Run a read-only diagnostic command against a service and attach its output.",
        parameters=_object(
            {"service": {"type": "string"}, "command": {"type": "string"}, "purpose": {"type": "string"}},
            ["service", "command", "purpose"],
        ),
    ),
    ToolDeclaration(
        name="rollback_deploy",
        description="Roll a service back to a previous version.",
        parameters=_object(
            {"service": {"type": "string"}, "to_version": {"type": "string"}, "reason": {"type": "string"}},
            ["service", "to_version", "reason"],
        ),
    ),
    ToolDeclaration(
        name="scale_workload",
        description="Change the replica count of a workload.",
        parameters=_object(
            {
                "service": {"type": "string"},
                "replicas": {"type": "integer", "minimum": 0, "maximum": 500},
                "reason": {"type": "string"},
            },
            ["service", "replicas", "reason"],
        ),
    ),
    ToolDeclaration(
        name="restart_workload",
        description="Restart the pods or processes of a workload, one at a time.",
        parameters=_object(
            {"service": {"type": "string"}, "reason": {"type": "string"}},
            ["service", "reason"],
        ),
    ),
    ToolDeclaration(
        name="page_team",
        description="Page an on-call team with a short message.",
        parameters=_object(
            {
                "team": {"type": "string"},
                "message": {"type": "string"},
                "urgency": {"type": "string", "enum": ["low", "high"]},
            },
            ["team", "message", "urgency"],
        ),
    ),
)

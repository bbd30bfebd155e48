"""The message interface as an AsyncAPI 3.0 document, built from the contracts (`python -m contracts.asyncapi`)."""

import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from .messages import SCHEMA_VERSION, InferenceReply, InferenceRequest
from .topology import DEFAULT_ATLAS_CLOUD_EXCHANGE, DEFAULT_NAMESPACE, REQUEST_ROUTING_KEY, Header

DOCUMENT_PATH = Path(__file__).parent / "asyncapi.yaml"
AMQP_BINDING_VERSION = "0.3.0"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _headers(description: str, fields: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {name: {"type": kind, "description": text} for name, (kind, text) in fields.items()},
        "additionalProperties": True,
    }


_FAILURE_FIELDS: dict[str, tuple[str, str]] = {
    Header.ATTEMPTS: ("integer", "Provider attempts made for this request so far."),
    Header.ERROR_CODE: ("string", "The last error's code, e.g. `timeout`, `rate_limit_exceeded`."),
    Header.ERROR_CLASS: ("string", "The last error's class: transient, rate_limited, quota, auth, not_found, …"),
    Header.ERROR_MESSAGE: ("string", "The last error's message (at most 1000 characters; never secrets)."),
    Header.PROVIDER_KIND: ("string", "The tenant's provider kind."),
    Header.FIRST_FAILURE_AT: ("string", "ISO 8601 time of the first failure."),
    Header.LAST_FAILURE_AT: ("string", "ISO 8601 time of the last failure."),
    Header.ORIGINAL_EXCHANGE: ("string", "The exchange the request was first published to."),
    Header.ORIGINAL_ROUTING_KEY: ("string", "The routing key it was first published with."),
}


def _exchange(name: str, kind: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": "/"},
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(InferenceRequest, "validation"), (InferenceReply, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(sorted(top["$defs"].items()))
    schemas["RequestHeaders"] = _headers(
        "Publishers set none of these (the worker ignores them unless it vouches for them); the worker writes "
        "them when it parks a request for a retry.",
        {
            Header.ATTEMPTS: _FAILURE_FIELDS[Header.ATTEMPTS],
            Header.RETRY_LEVEL: ("integer", "The retry level the request waited on."),
            Header.DEFERRALS: ("integer", "Times the request waited for the tenant's concurrency limit."),
            Header.SIGNATURE: ("object", "With a header key: an HMAC-SHA256 per worker header, by header name."),
        },
    )
    schemas["ReplyHeaders"] = _headers(
        "Copies of reply fields, so consumers can route or filter without parsing the body.",
        {
            Header.REQUEST_ID: ("string", "The request's `request_id`."),
            Header.TENANT_ID: ("string", "The request's `tenant_id`."),
            Header.TASK: ("string", "The request's `task`."),
            "atlas-status": ("string", "The reply's `status`."),
        },
    )
    schemas["DeadLetterHeaders"] = _headers(
        "Why the request was parked. Requests the broker dead-lettered itself (after `x-delivery-limit` "
        "deliveries) carry no `atlas-reason`; their reason is in `x-death[0].reason` (`delivery_limit`).",
        {
            Header.REASON: (
                "string",
                "malformed | publisher_refused | tenant_config_invalid | exhausted | expired | permanent_error | "
                "circuit_open | internal_error | reply_unroutable | reroute_unroutable",
            ),
            Header.DEAD_LETTERED_AT: ("string", "ISO 8601 time the worker dead-lettered it."),
            Header.DEAD_LETTER_ID: ("string", "Unique id the worker assigned; what `atlas-worker dlq` calls it."),
            Header.HEADERS_DROPPED: ("integer", "Publisher headers left off so the copy fits one frame."),
            Header.BODY_TRUNCATED: ("boolean", "The body is only a prefix of an oversized request body."),
            Header.ORIGINAL_BODY_BYTES: ("integer", "The oversized request body's size in bytes."),
            **_FAILURE_FIELDS,
        },
    )
    schemas["RerouteHeaders"] = _headers(
        "Why the request was sent to Atlas Cloud; the failure fields are present when a provider failure caused it.",
        {
            Header.REASON: ("string", "`no_byoc_config`, or the provider error class under policy `atlas_cloud`."),
            Header.REROUTED_FROM_TENANT: ("string", "The tenant whose request this is."),
            Header.REROUTED_AT: ("string", "ISO 8601 time of the reroute."),
            **_FAILURE_FIELDS,
        },
    )
    return schemas


def _message(name: str, title: str, summary: str, payload: str, headers: str) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
        "payload": _ref("schemas", payload),
        "headers": _ref("schemas", headers),
    }


def document() -> dict[str, Any]:
    ns = "{namespace}"
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "atlas-inference-worker",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                "Incident inference over RabbitMQ. Publishers send requests to the requests exchange with "
                f"routing key `{REQUEST_ROUTING_KEY}`, `content_type: application/json`, and for a direct answer "
                "the AMQP properties `reply_to` and `correlation_id`. The reply goes to `reply_to` through the "
                "default exchange (same `correlation_id`), else to the replies exchange with routing key "
                "`<tenant_id>.<task>`. Unknown fields are ignored, so publishers can upgrade first."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "rabbitmq:5672",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "RabbitMQ 3.10 or later; every name is prefixed by the deployment's namespace.",
            }
        },
        "channels": {
            "requests": {
                "address": f"{ns}.requests",
                "title": "Inference requests",
                "description": "Direct exchange; bound to the quorum queue of the same name.",
                "parameters": {"namespace": _ref("parameters", "namespace")},
                "messages": {"inferenceRequest": _ref("messages", "InferenceRequest")},
                "bindings": _exchange(f"{ns}.requests", "direct"),
            },
            "replyTo": {
                "address": None,
                "title": "The publisher's reply queue",
                "description": "The queue named by the request's `reply_to` property, via the default exchange.",
                "messages": {"inferenceReply": _ref("messages", "InferenceReply")},
            },
            "replies": {
                "address": f"{ns}.replies",
                "title": "Replies to requests without reply_to",
                "description": "Topic exchange, routing key `<tenant_id>.<task>`; a durable queue bound to `#`.",
                "parameters": {"namespace": _ref("parameters", "namespace")},
                "messages": {"inferenceReply": _ref("messages", "InferenceReply")},
                "bindings": _exchange(f"{ns}.replies", "topic"),
            },
            "deadLetters": {
                "address": f"{ns}.dead",
                "title": "Dead letters",
                "description": "Fanout exchange and its queue: requests parked for an operator (`atlas-worker dlq`).",
                "parameters": {"namespace": _ref("parameters", "namespace")},
                "messages": {"deadLetter": _ref("messages", "DeadLetter")},
                "bindings": _exchange(f"{ns}.dead", "fanout"),
            },
            "atlasCloud": {
                "address": DEFAULT_ATLAS_CLOUD_EXCHANGE,
                "title": "Atlas Cloud",
                "description": (
                    "Owned by Atlas Cloud (`--atlas-cloud-exchange`). Requests of tenants without a BYOC "
                    "configuration, and of tenants with policy `atlas_cloud` whose provider failed, are "
                    "republished here unchanged, routing key `<tenant_id>.<task>`, with `mandatory`."
                ),
                "messages": {"reroutedRequest": _ref("messages", "ReroutedRequest")},
                "bindings": _exchange(DEFAULT_ATLAS_CLOUD_EXCHANGE, "topic"),
            },
        },
        "operations": {
            "receiveRequest": {
                "action": "receive",
                "channel": {"$ref": "#/channels/requests"},
                "summary": "The worker consumes requests.",
                "messages": [{"$ref": "#/channels/requests/messages/inferenceRequest"}],
                "reply": {
                    "channel": {"$ref": "#/channels/replyTo"},
                    "messages": [{"$ref": "#/channels/replyTo/messages/inferenceReply"}],
                },
            },
            "sendReply": {
                "action": "send",
                "channel": {"$ref": "#/channels/replies"},
                "summary": "Replies to requests that named no `reply_to`.",
                "messages": [{"$ref": "#/channels/replies/messages/inferenceReply"}],
            },
            "sendDeadLetter": {
                "action": "send",
                "channel": {"$ref": "#/channels/deadLetters"},
                "summary": "Requests that cannot be answered now, with the reason in headers.",
                "messages": [{"$ref": "#/channels/deadLetters/messages/deadLetter"}],
            },
            "sendReroute": {
                "action": "send",
                "channel": {"$ref": "#/channels/atlasCloud"},
                "summary": "Requests Atlas Cloud answers instead (the data leaves the tenant's network).",
                "messages": [{"$ref": "#/channels/atlasCloud/messages/reroutedRequest"}],
            },
        },
        "components": {
            "parameters": {
                "namespace": {
                    "default": DEFAULT_NAMESPACE,
                    "description": "The deployment's namespace (`--namespace`).",
                }
            },
            "messages": {
                "InferenceRequest": _message(
                    "InferenceRequest",
                    "Inference request",
                    "An incident's context and what to do with it.",
                    "InferenceRequest",
                    "RequestHeaders",
                ),
                "InferenceReply": _message(
                    "InferenceReply",
                    "Inference reply",
                    "The answer, or why there is none.",
                    "InferenceReply",
                    "ReplyHeaders",
                ),
                "DeadLetter": _message(
                    "DeadLetter",
                    "Dead letter",
                    "The original request body, unchanged (or the malformed bytes that were received).",
                    "InferenceRequest",
                    "DeadLetterHeaders",
                ),
                "ReroutedRequest": _message(
                    "ReroutedRequest",
                    "Rerouted request",
                    "The original request, body and properties unchanged.",
                    "InferenceRequest",
                    "RerouteHeaders",
                ),
            },
            "schemas": _schemas(),
        },
    }


def render() -> str:
    import yaml  # a development dependency: generating the document is a build step, reading it is not

    text: str = yaml.safe_dump(document(), sort_keys=False, allow_unicode=True, width=120)
    return "# Generated from the contracts by `python -m contracts.asyncapi`; do not edit by hand.\n" + text


def main() -> int:
    DOCUMENT_PATH.write_text(render())
    print(f"wrote {DOCUMENT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

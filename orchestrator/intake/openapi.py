"""The OpenAPI 3 document served at ``/openapi.json``, written to match the behaviour.

Hand-written rather than generated, so each constraint here is one the handlers really
enforce (the schemathesis test holds both to that): request schemas reject exactly what
the API rejects, and every status code the API can answer is listed with its body.

Alert payloads are deliberately loose below the group level: one malformed alert is
listed in ``ignored`` rather than failing the delivery (see ``alertmanager.py``), so the
per-alert fields are documented but not constrained.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from orchestrator import __version__
from orchestrator.intake.alertmanager import MAX_ALERTS
from orchestrator.intake.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, WINDOW_S
from orchestrator.intake.schemas import (
    DEFAULT_PAGE_LIMIT,
    ID_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    JOB_ID_PATTERN,
    MAX_REASON_CHARS,
    MAX_REQUESTED_BY_CHARS,
    REGION_PATTERN,
)
from orchestrator.jobs import JobStatus
from orchestrator.store.base import MAX_PAGE_LIMIT

_REF = "#/components"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"{_REF}/{kind}/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_TIME: Final = {"type": "string", "format": "date-time"}

_ERROR_NAMES: Final = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "Unprocessable",
    429: "RateLimited",
    503: "Unavailable",
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _ref("responses", _ERROR_NAMES[s]) for s in statuses}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_RETRY_AFTER: Final = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 1},
}


def _error_response(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": _json_content(_ref("schemas", "Error")),
    }
    if headers:
        response["headers"] = headers
    return response


_COMPONENTS: Final[dict[str, Any]] = {
    "securitySchemes": {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "A source's `token` (Alertmanager `http_config.authorization`).",
        },
        "basicAuth": {
            "type": "http",
            "scheme": "basic",
            "description": "A source's `username`/`password` (`http_config.basic_auth`).",
        },
        "grafanaSignature": {
            "type": "apiKey",
            "in": "header",
            "name": SIGNATURE_HEADER,
            "description": (
                "Hex HMAC-SHA256 with the source's `hmac_secret` over the raw body, or over "
                f'`"{{timestamp}}:{{body}}"` when `{TIMESTAMP_HEADER}` carries Unix seconds '
                f"(accepted within {int(WINDOW_S)} s; an identical replay inside the window "
                "gets the first answer back and is not processed again)."
            ),
        },
    },
    "responses": {
        "BadRequest": _error_response("Unreadable JSON, bad query parameter or header."),
        "Unauthorized": _error_response(
            "Missing or wrong credentials, bad, stale or replayed signature.",
            **{"WWW-Authenticate": {"schema": {"type": "string"}}},
        ),
        "Forbidden": _error_response(
            "The source may not roll back this app, or may not use this endpoint "
            "(an audit row is written)."
        ),
        "NotFound": _error_response("No such rollback job."),
        "Conflict": _error_response(
            "The job is no longer queued or waiting, the Idempotency-Key was used for "
            "another target, or the same signed webhook is still being processed."
        ),
        "PayloadTooLarge": _error_response("The body exceeds `[server] max_body_bytes`."),
        "UnsupportedMediaType": _error_response("The body is not `application/json`."),
        "Unprocessable": _error_response("Valid JSON that does not match the schema."),
        "RateLimited": _error_response(
            "An `api` source exceeded its `rate_per_s`.", **{"Retry-After": _RETRY_AFTER}
        ),
        "Unavailable": _error_response(
            "The store cannot commit, the service is overloaded, or a webhook source exceeded "
            "its rate (503 because Alertmanager retries only 5xx). Retry after the header.",
            **{"Retry-After": _RETRY_AFTER},
        ),
    },
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                    },
                }
            },
        },
        "Attempt": {
            "type": "object",
            "required": ["number", "action", "started_at", "duration_ms", "outcome"],
            "properties": {
                "number": {"type": "integer", "minimum": 1},
                "action": {"type": "string"},
                "started_at": _TIME,
                "duration_ms": {"type": "integer", "minimum": 0},
                "http_status": _nullable({"type": "integer"}),
                "code": _nullable({"type": "string"}),
                "message": _nullable({"type": "string"}),
                "request_id": _nullable({"type": "string"}),
                "trace_id": _nullable({"type": "string"}),
                "outcome": {"type": "string", "enum": ["retry", "success", "failed"]},
            },
        },
        "Job": {
            "type": "object",
            "required": [
                "id",
                "change_order_id",
                "app_id",
                "region",
                "status",
                "source",
                "reason",
                "requested_by",
                "dry_run",
                "created_at",
                "updated_at",
                "finished_at",
                "next_attempt_at",
                "error",
                "attempts",
            ],
            "properties": {
                "id": {"type": "string"},
                "change_order_id": _nullable({"type": "string"}),
                "app_id": _nullable({"type": "string"}),
                "region": {"type": "string"},
                "status": {"type": "string", "enum": [s.value for s in JobStatus]},
                "source": {"type": "string"},
                "reason": {"type": "string"},
                "requested_by": {"type": "string"},
                "dry_run": {"type": "boolean"},
                "created_at": _TIME,
                "updated_at": _TIME,
                "finished_at": _nullable(_TIME),
                "next_attempt_at": _nullable(_TIME),
                "error": _nullable(
                    {
                        "type": "object",
                        "properties": {
                            "code": _nullable({"type": "string"}),
                            "message": _nullable({"type": "string"}),
                        },
                    }
                ),
                "attempts": {"type": "array", "items": _ref("schemas", "Attempt")},
            },
        },
        "SubmittedJob": {
            "allOf": [
                _ref("schemas", "Job"),
                {
                    "type": "object",
                    "required": ["deduplicated"],
                    "properties": {"deduplicated": {"type": "boolean"}},
                },
            ]
        },
        "JobPage": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {
                "items": {"type": "array", "items": _ref("schemas", "Job")},
                "next_cursor": _nullable({"type": "string"}),
            },
        },
        "RollbackRequest": {
            "type": "object",
            "description": "At least one of change_order_id and app_id. Unknown fields are "
            "refused (422).",
            "additionalProperties": False,
            "properties": {
                "change_order_id": {"type": "string", "pattern": ID_PATTERN, "maxLength": 128},
                "app_id": {"type": "string", "pattern": ID_PATTERN, "maxLength": 128},
                "reason": {"type": "string", "maxLength": MAX_REASON_CHARS},
                "requested_by": {"type": "string", "maxLength": MAX_REQUESTED_BY_CHARS},
                "region": {
                    "type": "string",
                    "pattern": REGION_PATTERN,
                    "maxLength": 64,
                    "description": "Defaults to `[sae] region`.",
                },
            },
            "anyOf": [{"required": ["change_order_id"]}, {"required": ["app_id"]}],
        },
        "CancelRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"reason": {"type": "string", "maxLength": MAX_REASON_CHARS}},
        },
        "AlertGroup": {
            "type": "object",
            "description": (
                'An Alertmanager webhook body (version "4"; ARMS `$alertmanager_content` '
                'too) or a Grafana one (version "1"). Each firing alert naming '
                "`sae_change_order_id` and/or `sae_app_id` (labels first, then annotations; "
                "optional `sae_region`) becomes one job, keyed by fingerprint + startsAt. "
                "Alerts that start nothing, including malformed ones, are listed in "
                "`ignored` with the reason."
            ),
            "required": ["alerts"],
            "properties": {
                "version": {"type": "string", "enum": ["4", "1"]},
                "status": {"description": "firing or resolved (each alert's own wins)."},
                "receiver": {"description": "The sender's receiver name."},
                "groupKey": {"description": "Opaque group identifier."},
                "truncatedAlerts": {"description": "Alerts dropped by max_alerts (logged)."},
                "alerts": {
                    "type": "array",
                    "maxItems": MAX_ALERTS,
                    "items": _ref("schemas", "Alert"),
                },
            },
        },
        "Alert": {
            "description": (
                "One alert. Its fields are documented, not enforced: an alert that does "
                "not fit is listed in `ignored`, the rest of the group still counts."
            ),
            "properties": {
                "status": {"description": "firing or resolved"},
                "labels": {"description": "string → string; `sae_*` target keys here first"},
                "annotations": {"description": "string → string; then `sae_*` keys here"},
                "startsAt": {"description": "RFC 3339 start of the alert episode"},
                "endsAt": {"description": "RFC 3339"},
                "fingerprint": {
                    "description": "Alertmanager's label-set hash; computed the same way "
                    "when absent"
                },
                "values": {"description": "Grafana: what triggered the alert"},
            },
        },
        "Ignored": {
            "type": "object",
            "required": ["fingerprint", "reason"],
            "properties": {
                "fingerprint": _nullable({"type": "string"}),
                "reason": {"type": "string"},
            },
        },
        "WebhookResult": {
            "type": "object",
            "required": ["accepted", "deduplicated", "ignored", "cancelled"],
            "properties": {
                "accepted": {"type": "array", "items": {"type": "string"}},
                "deduplicated": {"type": "array", "items": {"type": "string"}},
                "ignored": {"type": "array", "items": _ref("schemas", "Ignored")},
                "cancelled": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Jobs cancelled because their alert resolved "
                    "(`cancel_on_resolved`).",
                },
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}},
        },
    },
}

_ANY_SOURCE: Final[list[dict[str, list[str]]]] = [{"bearerAuth": []}, {"basicAuth": []}]
_JOB_ID_PARAM: Final = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
}


def _paths() -> dict[str, Any]:
    webhook = {
        "summary": "Alertmanager / Grafana / ARMS webhook for one configured source",
        "description": (
            "Authenticated with the source's own credentials: bearer or basic, and the HMAC "
            "signature when the source has an `hmac_secret`. Returns 202 only after every "
            "job is committed. A delivery whose every target is an app the source may not "
            "roll back is refused with 403; otherwise such targets are listed in `ignored`."
        ),
        "security": [*_ANY_SOURCE, {"grafanaSignature": []}],
        "parameters": [
            {
                "name": "source",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "The `[sources.NAME]` table's name.",
            },
            {
                "name": TIMESTAMP_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "Grafana's optional signature timestamp (Unix seconds).",
            },
        ],
        "requestBody": {"required": True, "content": _json_content(_ref("schemas", "AlertGroup"))},
        "responses": {
            "202": {
                "description": "Committed: what each alert became.",
                "content": _json_content(_ref("schemas", "WebhookResult")),
            },
            **_errors(400, 401, 403, 409, 413, 415, 422, 503),
        },
    }
    return {
        "/v1/rollbacks": {
            "post": {
                "summary": "Request a rollback (api sources)",
                "security": _ANY_SOURCE,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "pattern": IDEMPOTENCY_KEY_PATTERN,
                            "maxLength": 255,
                        },
                        "description": "Replays (per source) return the job of the first "
                        "request; reuse with a different target is refused (409).",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": _json_content(_ref("schemas", "RollbackRequest")),
                },
                "responses": {
                    "202": {
                        "description": "A new job, committed.",
                        "content": _json_content(_ref("schemas", "SubmittedJob")),
                    },
                    "200": {
                        "description": "The existing live job for this change order/app, or "
                        "the job of an earlier request with the same Idempotency-Key.",
                        "content": _json_content(_ref("schemas", "SubmittedJob")),
                    },
                    **_errors(400, 401, 403, 409, 413, 415, 422, 429, 503),
                },
            },
            "get": {
                "summary": "List rollback jobs, newest first",
                "security": _ANY_SOURCE,
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in JobStatus]},
                    },
                    {
                        "name": "app_id",
                        "in": "query",
                        "schema": {"type": "string", "pattern": ID_PATTERN},
                    },
                    {
                        "name": "source",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_PAGE_LIMIT,
                            "default": DEFAULT_PAGE_LIMIT,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "string", "maxLength": 200},
                        "description": "`next_cursor` of the previous page.",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "One page.",
                        "content": _json_content(_ref("schemas", "JobPage")),
                    },
                    **_errors(400, 401, 503),
                },
            },
        },
        "/v1/rollbacks/{id}": {
            "get": {
                "summary": "One job with its attempts",
                "security": _ANY_SOURCE,
                "parameters": [_JOB_ID_PARAM],
                "responses": {
                    "200": {
                        "description": "The job.",
                        "content": _json_content(_ref("schemas", "Job")),
                    },
                    **_errors(401, 404, 503),
                },
            }
        },
        "/v1/rollbacks/{id}/cancel": {
            "post": {
                "summary": "Cancel a queued or waiting job (api sources)",
                "security": _ANY_SOURCE,
                "parameters": [_JOB_ID_PARAM],
                "requestBody": {
                    "required": False,
                    "content": _json_content(_ref("schemas", "CancelRequest")),
                },
                "responses": {
                    "200": {
                        "description": "The cancelled job.",
                        "content": _json_content(_ref("schemas", "Job")),
                    },
                    **_errors(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
                },
            }
        },
        "/v1/webhooks/{source}": {
            "post": {**webhook, "operationId": "postWebhook"},
            "put": {**webhook, "operationId": "putWebhook"},
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The process serves requests.",
                        "content": _json_content(_ref("schemas", "Status")),
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the store answers",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Ready.",
                        "content": _json_content(_ref("schemas", "Status")),
                    },
                    "503": _ref("responses", "Unavailable"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3 document.",
                        "content": _json_content({"type": "object"}),
                    }
                },
            }
        },
    }


def build_document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI document (callers may modify it)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "sae-rollback",
            "version": __version__,
            "description": (
                "Turns alerts and requests into durable, verified rollbacks of Alibaba "
                "Cloud SAE change orders. Every error body is "
                '`{"error": {"code", "message"}}`.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": _ANY_SOURCE,
        "paths": _paths(),
        "components": copy.deepcopy(_COMPONENTS),
    }

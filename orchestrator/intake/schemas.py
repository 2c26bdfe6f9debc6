"""Request validation for the intake API and the one error shape every answer uses.

Everything a caller sends is checked here before it reaches the store: the body of
``POST /v1/rollbacks``, query parameters of ``GET /v1/rollbacks``, the ``Idempotency-Key``
header, and the identifiers (app id, change order id, region) that alerts carry. Nothing
here does I/O; a refusal is an :class:`ApiError` that the app's middleware renders as::

    {"error": {"code": "...", "message": "..."}}

Error classes (all :class:`~orchestrator.errors.RollbackError`)::

    ApiError                 status + code + message (+ headers), rendered by the middleware
    ├── BadRequest           400: unreadable JSON, bad query parameter or header
    ├── Unauthorized         401: missing/wrong credentials, bad signature, stale or replayed
    ├── Forbidden            403: authenticated, but not allowed (app, endpoint)
    ├── NotFound             404
    ├── Conflict             409: the job's state does not allow the change
    ├── PayloadTooLarge      413
    ├── UnsupportedMedia     415
    ├── Unprocessable        422: well-formed JSON that breaks the schema
    ├── RateLimited          429 (api sources) / 503 (webhook sources), with Retry-After
    └── Unavailable          503 with Retry-After: the store cannot commit, or overload

Identifiers are checked with conservative patterns because they travel on: the region
selects an SAE endpoint (``sae.<region>.aliyuncs.com``), so a payload must never be able
to smuggle a host name or path through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from orchestrator.errors import RollbackError
from orchestrator.jobs import JobStatus
from orchestrator.store.base import MAX_PAGE_LIMIT

#: App ids and change order ids: SAE uses UUIDs; names like ``demo-app`` are allowed too.
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
#: Alibaba Cloud region ids: ``cn-hangzhou``, ``ap-southeast-1``, ``cn-shanghai-finance-1``.
REGION_PATTERN: Final = r"^[a-z]{2,4}(-[a-z0-9]{1,20}){1,4}$"
#: Job ids are UUIDs (v7) today; accept any short token so a future format still routes.
JOB_ID_PATTERN: Final = r"^[A-Za-z0-9-]{1,64}$"
#: Idempotency keys: printable ASCII without spaces, as in the IETF draft's examples.
IDEMPOTENCY_KEY_PATTERN: Final = r"^[\x21-\x7e]{1,255}$"

MAX_REASON_CHARS: Final = 1000
MAX_REQUESTED_BY_CHARS: Final = 200
DEFAULT_PAGE_LIMIT: Final = 50

_ID = re.compile(ID_PATTERN)
_REGION = re.compile(REGION_PATTERN)
_JOB_ID = re.compile(JOB_ID_PATTERN)
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


class ApiError(RollbackError):
    """A refusal with its HTTP status, a stable machine-readable code and a message."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON error body of the contract."""
        return error_body(self.code, self.message)


class BadRequest(ApiError):
    """400: the request cannot be read (bad JSON, query parameter or header)."""

    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    """401: no valid credentials for this endpoint."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid credentials", **kw: Any) -> None:
        headers = {"WWW-Authenticate": 'Bearer realm="sae-rollback"', **kw.pop("headers", {})}
        super().__init__(message, headers=headers, **kw)


class Forbidden(ApiError):
    """403: authenticated, but this source may not do this."""

    status = 403
    code = "forbidden"


class NotFound(ApiError):
    """404: no such job or route."""

    status = 404
    code = "not_found"


class Conflict(ApiError):
    """409: the job's current state does not allow the change."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    """413: the body exceeds ``[server] max_body_bytes``."""

    status = 413
    code = "payload_too_large"


class UnsupportedMedia(ApiError):
    """415: the body is not JSON."""

    status = 415
    code = "unsupported_media_type"


class Unprocessable(ApiError):
    """422: valid JSON that does not match the schema."""

    status = 422
    code = "invalid_payload"


class RateLimited(ApiError):
    """429: this source sent more than its configured rate; retry after the header's delay."""

    status = 429
    code = "rate_limited"


class Unavailable(ApiError):
    """503: try again later (store cannot commit, overload, webhook rate limit)."""

    status = 503
    code = "unavailable"


def retry_after_header(seconds: float) -> dict[str, str]:
    """A ``Retry-After`` header in whole seconds (at least 1: 0 invites a hot retry loop)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_body(code: str, message: str) -> dict[str, Any]:
    """``{"error": {"code", "message"}}``: the shape of every non-2xx answer."""
    return {"error": {"code": code, "message": message}}


# -- identifiers ----------------------------------------------------------------------------


def is_valid_id(value: str) -> bool:
    """Whether ``value`` is an acceptable app id or change order id."""
    return _ID.fullmatch(value) is not None


def is_valid_region(value: str) -> bool:
    """Whether ``value`` looks like an Alibaba Cloud region id (and nothing else)."""
    return _REGION.fullmatch(value) is not None


def is_valid_job_id(value: str) -> bool:
    """Whether ``value`` could be a job id (anything else is a 404 without a store read)."""
    return _JOB_ID.fullmatch(value) is not None


def parse_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header, checked (``None`` when absent)."""
    if value is None:
        return None
    if _IDEMPOTENCY_KEY.fullmatch(value) is None:
        raise BadRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces",
            code="invalid_idempotency_key",
        )
    return value


# -- POST /v1/rollbacks -----------------------------------------------------------------------

_ROLLBACK_FIELDS: Final = frozenset(
    {"change_order_id", "app_id", "reason", "requested_by", "region"}
)


@dataclass(frozen=True, slots=True)
class RollbackRequest:
    """A validated ``POST /v1/rollbacks`` body."""

    change_order_id: str | None
    app_id: str | None
    reason: str
    requested_by: str
    region: str | None


def _optional_text(body: Mapping[str, Any], name: str, max_chars: int) -> str | None:
    if name not in body:
        return None
    value = body[name]
    if not isinstance(value, str):  # null too: leave a field out rather than send null
        raise Unprocessable(f"{name} must be a string")
    if len(value) > max_chars:
        raise Unprocessable(f"{name} must be at most {max_chars} characters")
    return value


def _optional_id(body: Mapping[str, Any], name: str) -> str | None:
    value = _optional_text(body, name, 128)
    if value is not None and not is_valid_id(value):
        raise Unprocessable(
            f"{name} must be 1-128 characters: letters, digits and . _ : - "
            "(starting with a letter or digit)"
        )
    return value


def parse_rollback_request(body: Any) -> RollbackRequest:
    """Validate the JSON body of ``POST /v1/rollbacks`` (``Unprocessable`` on any problem).

    Unknown fields are refused rather than ignored: ``"changeOrderId"`` silently dropped
    would turn a targeted rollback into a 422 about a missing target at best, and into a
    rollback of the wrong thing at worst.
    """
    if not isinstance(body, dict):
        raise Unprocessable("the body must be a JSON object")
    unknown = sorted(str(k) for k in body if k not in _ROLLBACK_FIELDS)
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)}")
    change_order_id = _optional_id(body, "change_order_id")
    app_id = _optional_id(body, "app_id")
    if change_order_id is None and app_id is None:
        raise Unprocessable("one of change_order_id or app_id is required")
    region = _optional_text(body, "region", 64)
    if region is not None and not is_valid_region(region):
        raise Unprocessable("region must be an Alibaba Cloud region id such as cn-hangzhou")
    return RollbackRequest(
        change_order_id=change_order_id,
        app_id=app_id,
        reason=_optional_text(body, "reason", MAX_REASON_CHARS) or "",
        requested_by=_optional_text(body, "requested_by", MAX_REQUESTED_BY_CHARS) or "",
        region=region,
    )


def parse_cancel_request(body: Any) -> str | None:
    """The optional ``{"reason"}`` of ``POST /v1/rollbacks/{id}/cancel`` (``None``: no body)."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise Unprocessable("the body must be a JSON object")
    unknown = sorted(str(k) for k in body if k != "reason")
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)}")
    return _optional_text(body, "reason", MAX_REASON_CHARS)


# -- GET /v1/rollbacks ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListQuery:
    """Validated query parameters of ``GET /v1/rollbacks``."""

    status: JobStatus | None
    app_id: str | None
    source: str | None
    limit: int
    cursor: str | None


_LIST_PARAMS: Final = frozenset({"status", "app_id", "source", "limit", "cursor"})


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """Validate ``status``, ``app_id``, ``source``, ``limit`` and ``cursor`` (400 otherwise)."""
    unknown = sorted(k for k in query if k not in _LIST_PARAMS)
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    status: JobStatus | None = None
    raw_status = query.get("status")
    if raw_status is not None:
        try:
            status = JobStatus(raw_status)
        except ValueError:
            allowed = ", ".join(s.value for s in JobStatus)
            raise BadRequest(f"status must be one of: {allowed}") from None
    app_id = query.get("app_id")
    if app_id is not None and not is_valid_id(app_id):
        raise BadRequest("app_id is not a valid app id")
    source = query.get("source")
    if source is not None and not (
        0 < len(source) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in source)
    ):
        raise BadRequest("source is not a valid source name")
    limit = DEFAULT_PAGE_LIMIT
    raw_limit = query.get("limit")
    if raw_limit is not None:
        if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6):
            raise BadRequest(f"limit must be an integer between 1 and {MAX_PAGE_LIMIT}")
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            raise BadRequest(f"limit must be an integer between 1 and {MAX_PAGE_LIMIT}")
    cursor = query.get("cursor")
    if cursor is not None and not (0 < len(cursor) <= 200 and cursor.isascii()):
        raise BadRequest("malformed cursor")
    return ListQuery(status=status, app_id=app_id, source=source, limit=limit, cursor=cursor)

"""Typed values the SAE client returns: the per-call outcome record and the parsed action results.

:class:`CallOutcome` is what every call leaves behind, success or failure: the worker stores it as
an attempt row and the ``on_call`` hook turns it into metrics and logs. The result dataclasses
(:class:`AbortResult`, :class:`ChangeOrder`, :class:`ChangeOrderPage`, :class:`AppStatus`) are
parsed leniently from SAE's JSON: unknown fields are ignored, missing fields become ``None``,
numbers may arrive as strings and keys in any letter case (``Code`` / ``code``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "CODE_SUCCESS",
    "CODE_TRANSPORT",
    "TERMINAL_STATUSES",
    "AbortResult",
    "AppStatus",
    "CallOutcome",
    "ChangeOrder",
    "ChangeOrderPage",
    "ChangeOrderStatus",
    "ChangeOrderSummary",
    "Classification",
    "Pipeline",
    "data_object",
    "get_field",
    "parse_app_status",
    "parse_change_order",
    "parse_change_order_page",
]

#: ``CallOutcome.code`` of a successful call (the value of the metrics ``code`` label).
CODE_SUCCESS = "Success"
#: ``CallOutcome.code`` when no parsable answer came (connect error, timeout, reset, garbage body).
CODE_TRANSPORT = "Transport"


class Classification(enum.StrEnum):
    """How a failed call is classified; the value names the worker's retry reason."""

    BUSY = "busy"
    THROTTLED = "throttled"
    SERVER = "server"
    TRANSPORT = "transport"
    NOT_RUNNING = "not_running"
    PERMANENT = "permanent"


class ChangeOrderStatus(enum.IntEnum):
    """Change-order status codes shared by DescribeChangeOrder, pipelines and ListChangeOrders."""

    PREPARING = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    ABORTED = 6
    WAIT_BATCH_CONFIRM = 8
    AUTO_BATCH_WAIT = 9
    SYSTEM_FAILED = 10
    WAIT_APPROVAL = 11
    APPROVED = 12


#: Statuses after which a change order never changes again (sae-api.md §2.1).
TERMINAL_STATUSES = frozenset(
    {
        ChangeOrderStatus.SUCCEEDED,
        ChangeOrderStatus.FAILED,
        ChangeOrderStatus.ABORTED,
        ChangeOrderStatus.SYSTEM_FAILED,
    }
)


@dataclass(frozen=True)
class CallOutcome:
    """What one SAE call did, recorded whether it succeeded or not.

    ``code`` is normalized: ``"Success"`` for a successful call; the SAE error code (``ErrorCode``
    preferred, then a non-numeric ``Code``) for an answered failure; the numeric ``Code`` or the
    HTTP status as text when the body names no error (``"Success.NotTrue"`` for a 2xx whose
    ``Success`` is not true); ``"Transport"`` when no parsable answer came; ``"InvalidCredentials"``
    when no credentials could be obtained (nothing was sent).
    ``error_code`` is the body's ``ErrorCode`` as sent (``None`` when absent). ``http_status`` is
    ``None`` when no answer came. ``classification`` is ``None`` on success. ``retry_after_s`` is
    the ``x-acs-retry-after`` header converted from milliseconds. Holds no credentials.
    """

    action: str
    http_status: int | None
    code: str
    error_code: str | None
    message: str | None
    request_id: str | None
    trace_id: str | None
    duration_s: float
    started_at: datetime
    classification: Classification | None = None
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        """True when the call succeeded."""
        return self.classification is None


@dataclass(frozen=True)
class AbortResult:
    """An accepted AbortAndRollbackChangeOrder: SAE started rolling the change order back.

    ``change_order_id`` is ``Data.ChangeOrderId`` as answered; it is not confirmed whether SAE
    returns the aborted order's id or a new rollback order's id (sae-api.md §8), so callers
    reconcile through DescribeApplicationStatus' ``last_change_order_id`` as well.
    """

    change_order_id: str | None
    outcome: CallOutcome


@dataclass(frozen=True)
class Pipeline:
    """One batch (pipeline) of a change order."""

    pipeline_id: str | None
    pipeline_name: str | None
    status: int | None
    start_time_ms: int | None
    update_time_ms: int | None
    batch_type: int | None
    parallel_count: int | None


@dataclass(frozen=True)
class ChangeOrder:
    """DescribeChangeOrder's ``Data``: one change order in detail."""

    change_order_id: str | None
    app_id: str | None
    app_name: str | None
    status: int | None
    sub_status: int | None
    support_rollback: bool | None
    co_type: str | None
    co_type_code: str | None
    create_time: str | None
    description: str | None
    error_message: str | None
    batch_count: int | None
    batch_type: str | None
    batch_wait_time: int | None
    auto: bool | None
    current_pipeline_id: str | None
    pipelines: tuple[Pipeline, ...]
    outcome: CallOutcome

    @property
    def is_terminal(self) -> bool:
        """True when the status is one that never changes again (2, 3, 6, 10)."""
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class ChangeOrderSummary:
    """One item of ListChangeOrders' ``Data.ChangeOrderList``."""

    change_order_id: str | None
    app_id: str | None
    group_id: str | None
    status: int | None
    co_type: str | None
    co_type_code: str | None
    create_time: str | None
    finish_time: str | None
    create_user_id: str | None
    user_id: str | None
    description: str | None
    source: str | None
    batch_count: int | None
    batch_type: str | None

    @property
    def is_terminal(self) -> bool:
        """True when the status is one that never changes again (2, 3, 6, 10)."""
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class ChangeOrderPage:
    """One page of ListChangeOrders."""

    items: tuple[ChangeOrderSummary, ...]
    current_page: int | None
    page_size: int | None
    total_size: int | None
    outcome: CallOutcome


@dataclass(frozen=True)
class AppStatus:
    """DescribeApplicationStatus' ``Data``: the app and its most recent change order."""

    app_id: str | None
    current_status: str | None
    running_instances: int | None
    last_change_order_id: str | None
    last_change_order_running: bool | None
    last_change_order_status: str | None
    sub_status: str | None
    outcome: CallOutcome


# --- lenient field access -------------------------------------------------------------------


def get_field(data: Mapping[str, Any], name: str) -> Any:
    """``data[name]``, else the first key equal to ``name`` ignoring case, else ``None``.

    SAE documents ``Code`` but the SDK also reads ``code``; the exact spelling wins when both
    are present.
    """
    if name in data:
        return data[name]
    lowered = name.lower()
    for key, value in data.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


def _str(data: Mapping[str, Any], name: str) -> str | None:
    value = get_field(data, name)
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _int(data: Mapping[str, Any], name: str) -> int | None:
    value = get_field(data, name)
    if isinstance(value, bool):
        # bool is an int subclass; a boolean where a number belongs is a malformed field.
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _bool(data: Mapping[str, Any], name: str) -> bool | None:
    value = get_field(data, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _object(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = get_field(data, name)
    return value if isinstance(value, dict) else {}


def _objects(data: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    # Older SAE examples show a single object where the SDK model has an array: accept both.
    value = get_field(data, name)
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    return []


def _pipeline(data: Mapping[str, Any]) -> Pipeline:
    return Pipeline(
        pipeline_id=_str(data, "PipelineId"),
        pipeline_name=_str(data, "PipelineName"),
        status=_int(data, "Status"),
        start_time_ms=_int(data, "StartTime"),
        update_time_ms=_int(data, "UpdateTime"),
        batch_type=_int(data, "BatchType"),
        parallel_count=_int(data, "ParallelCount"),
    )


def parse_change_order(data: Mapping[str, Any], outcome: CallOutcome) -> ChangeOrder:
    """Build a :class:`ChangeOrder` from DescribeChangeOrder's ``Data`` object."""
    return ChangeOrder(
        change_order_id=_str(data, "ChangeOrderId"),
        app_id=_str(data, "AppId"),
        app_name=_str(data, "AppName"),
        status=_int(data, "Status"),
        sub_status=_int(data, "SubStatus"),
        support_rollback=_bool(data, "SupportRollback"),
        co_type=_str(data, "CoType"),
        co_type_code=_str(data, "CoTypeCode"),
        create_time=_str(data, "CreateTime"),
        description=_str(data, "Description"),
        error_message=_str(data, "ErrorMessage"),
        batch_count=_int(data, "BatchCount"),
        batch_type=_str(data, "BatchType"),
        batch_wait_time=_int(data, "BatchWaitTime"),
        auto=_bool(data, "Auto"),
        current_pipeline_id=_str(data, "CurrentPipelineId"),
        pipelines=tuple(_pipeline(item) for item in _objects(data, "Pipelines")),
        outcome=outcome,
    )


def _summary(data: Mapping[str, Any]) -> ChangeOrderSummary:
    return ChangeOrderSummary(
        change_order_id=_str(data, "ChangeOrderId"),
        app_id=_str(data, "AppId"),
        group_id=_str(data, "GroupId"),
        status=_int(data, "Status"),
        co_type=_str(data, "CoType"),
        co_type_code=_str(data, "CoTypeCode"),
        create_time=_str(data, "CreateTime"),
        finish_time=_str(data, "FinishTime"),
        create_user_id=_str(data, "CreateUserId"),
        user_id=_str(data, "UserId"),
        description=_str(data, "Description"),
        source=_str(data, "Source"),
        batch_count=_int(data, "BatchCount"),
        batch_type=_str(data, "BatchType"),
    )


def parse_change_order_page(data: Mapping[str, Any], outcome: CallOutcome) -> ChangeOrderPage:
    """Build a :class:`ChangeOrderPage` from ListChangeOrders' ``Data`` object."""
    return ChangeOrderPage(
        items=tuple(_summary(item) for item in _objects(data, "ChangeOrderList")),
        current_page=_int(data, "CurrentPage"),
        page_size=_int(data, "PageSize"),
        total_size=_int(data, "TotalSize"),
        outcome=outcome,
    )


def parse_app_status(data: Mapping[str, Any], outcome: CallOutcome) -> AppStatus:
    """Build an :class:`AppStatus` from DescribeApplicationStatus' ``Data`` object."""
    return AppStatus(
        app_id=_str(data, "AppId"),
        current_status=_str(data, "CurrentStatus"),
        running_instances=_int(data, "RunningInstances"),
        last_change_order_id=_str(data, "LastChangeOrderId") or None,
        last_change_order_running=_bool(data, "LastChangeOrderRunning"),
        last_change_order_status=_str(data, "LastChangeOrderStatus"),
        sub_status=_str(data, "SubStatus"),
        outcome=outcome,
    )


def data_object(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The envelope's ``Data`` object, or an empty mapping when it is absent or not an object."""
    return _object(body, "Data")

"""The simulator's world: apps, change orders, call budget and call log. Pure, clock injected.

Nothing here does I/O or sleeps. Every time-dependent answer is computed lazily from the
injected ``clock`` (wall-clock seconds, ``time.time`` by default), so a unit test moves time by
moving a number and no background task runs per change order.

Change-order status codes are those of sae-api.md §2.1. The rules the simulator enforces:

* One non-terminal change order per app. Creating a second one through the control API is
  refused with ``Application.ChangerOrderRunning`` (what SAE answers when a change overlaps).
* ``AbortAndRollbackChangeOrder`` on an order whose status is non-terminal
  (:data:`ABORTABLE_STATUSES`: 0, 1, 8, 9, 11, 12) is accepted: the order reports status 1 for
  its ``rollback_s`` seconds (the rollback runs), then 6 (terminated, rolled back).
* Any further abort of that order, during the rollback or after, and any abort of a terminal
  order (2, 3, 6, 10) answers ``Application.ChangerOrder.Not.Running``.
* While an app is *busy* (another change holds it, set through the control API), aborts of its
  orders answer ``Application.ChangerOrderRunning``.
* An order created with ``support_rollback=False`` cannot be aborted-and-rolled-back. SAE
  documents no code for this, so the simulator answers the documented SAE parameter error
  ``InvalidParameter.WithMessage`` (HTTP 400) naming the reason, and the order keeps running:
  a permanent refusal the caller must not retry, matching §2.5's advice to check
  ``SupportRollback`` first. [INF]

Order of checks for an abort: missing id, unknown order, already aborted or terminal, rollback
not supported, app busy, then accept.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

__all__ = [
    "ABORTABLE_STATUSES",
    "LAST_STATUS_NAMES",
    "TERMINAL_STATUSES",
    "ApiError",
    "App",
    "CallBudget",
    "CallRecord",
    "ChangeOrder",
    "CoStatus",
    "ControlError",
    "SimState",
    "api_error",
    "default_status",
    "is_gateway_code",
]


class CoStatus(IntEnum):
    """Change-order status codes (sae-api.md §2.1)."""

    READY = 0
    RUNNING = 1
    SUCCESS = 2
    FAIL = 3
    ABORT = 6
    WAIT_BATCH_CONFIRM = 8
    AUTO_BATCH_WAIT = 9
    SYSTEM_FAIL = 10
    WAIT_APPROVAL = 11
    APPROVED = 12


TERMINAL_STATUSES: Final[frozenset[int]] = frozenset({2, 3, 6, 10})
# Every non-terminal status can be stopped: SAE's console offers "terminate" for orders that are
# preparing, executing, paused between batches, or waiting for approval.
ABORTABLE_STATUSES: Final[frozenset[int]] = frozenset(int(s) for s in CoStatus) - TERMINAL_STATUSES

# DescribeApplicationStatus.LastChangeOrderStatus strings (sae-api.md §2.3, inferred mapping).
LAST_STATUS_NAMES: Final[dict[int, str]] = {
    0: "READY",
    1: "RUNNING",
    2: "SUCCESS",
    3: "FAIL",
    6: "ABORT",
    8: "WAIT_BATCH_CONFIRM",
    9: "AUTO_BATCH_WAIT",
    10: "SYSTEM_FAIL",
    11: "WAIT_APPROVAL",
    12: "APPROVED",
}

# code -> (HTTP status, message, gateway?) for every answer the simulator can give. Gateway
# (POP) errors carry no TraceId/ErrorCode/Success/Data; SAE business errors do (sae-api.md §3.1).
_CATALOGUE: Final[dict[str, tuple[int, str, bool]]] = {
    # SAE business errors (sae-api.md §1.3, §2.3, §2.4)
    "InvalidParameter.NotEmpty": (400, "You must specify the parameter {0}.", False),
    "InvalidParameter.WithMessage": (400, "The parameter is invalid {0}: {1}", False),
    "Resouce.no.permission": (
        400,
        "You are not authorized to operate on the specified resources.",
        False,
    ),
    "Application.ChangerOrderRunning": (
        400,
        "An application change process is in progress. Please try again later.",
        False,
    ),
    "InvalidChangeOrder.NotFound": (400, "The current change order does not exist.", False),
    "Application.ChangerOrder.Not.Running": (
        400,
        "The change order is not running and cannot be terminated.",
        False,
    ),
    "System.Upgrading": (400, "The system is being upgraded. Please try again later.", False),
    "Application.InvalidStatus": (400, "The application status is abnormal.", False),
    "InvalidAppId.NotFound": (404, "The specified application does not exist.", False),
    # Gateway errors (sae-api.md §3.3)
    "InvalidApi.NotFound": (
        404,
        "Specified api is not found, please check your url and method.",
        True,
    ),
    "IncompleteSignature": (
        400,
        "The request signature does not conform to Aliyun standards. {0}",
        True,
    ),
    "SignatureDoesNotMatch": (
        400,
        "Specified signature is not matched with our calculation. server string to sign is:{0}",
        True,
    ),
    "InvalidAccessKeyId.NotFound": (404, "Specified access key is not found.", True),
    "InvalidSecurityToken.Malformed": (400, "Specified SecurityToken is malformed.", True),
    "InvalidTimeStamp.Expired": (
        400,
        "Specified time stamp or date value is expired. {0}",
        True,
    ),
    "InvalidTimeStamp.Format": (
        400,
        "Specified time stamp or date value is not well formatted.",
        True,
    ),
    "SignatureNonceUsed": (400, "Specified signature nonce was used already.", True),
    "Throttling.User": (400, "Request was denied due to user flow control.", True),
    "Throttling.Api": (400, "Request was denied due to api flow control.", True),
    "Throttling": (400, "Request was denied due to flow control.", True),
    "ServiceUnavailable": (
        503,
        "The request has failed due to a temporary failure of the server.",
        True,
    ),
    "InternalError": (
        500,
        "The request processing has failed due to some unknown error, exception or failure.",
        True,
    ),
    "Forbidden.RAM": (403, "User not authorized to operate on the specified resource.", True),
}


_PLACEHOLDER: Final = re.compile(r" ?\{\d\}:?")


class ApiError(Exception):
    """An error answer of the simulated SAE API (gateway or business), not a simulator fault.

    Raised by the state machine and the verifier, turned into the JSON error body by the HTTP
    layer; it never leaves the simulator.
    """

    def __init__(self, code: str, message: str, http_status: int, *, gateway: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status
        self.gateway = gateway


def api_error(code: str, *args: str, http_status: int | None = None) -> ApiError:
    """Build the :class:`ApiError` for ``code`` with the catalogue's status and message.

    ``args`` fill the message's ``{0}``, ``{1}`` placeholders. Codes outside the catalogue (a
    fault may name any code) get a generic message, HTTP 400 (or ``http_status``), business body.
    """
    known = _CATALOGUE.get(code)
    if known is None:
        return ApiError(
            code, "Simulated error.", 400 if http_status is None else http_status, gateway=False
        )
    status, template, gateway = known
    message = template.format(*args) if args else _PLACEHOLDER.sub("", template)
    return ApiError(code, message, status if http_status is None else http_status, gateway=gateway)


def is_gateway_code(code: str) -> bool:
    """Whether ``code`` is answered by the POP gateway (no SAE business fields in the body)."""
    known = _CATALOGUE.get(code)
    return known is not None and known[2]


def default_status(code: str) -> int | None:
    """The HTTP status the catalogue gives ``code``, or ``None`` if the code is not known."""
    known = _CATALOGUE.get(code)
    return None if known is None else known[0]


class ControlError(Exception):
    """Bad input to a ``/_sim/*`` control endpoint; answered as ``{"error": {code, message}}``."""

    def __init__(self, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass(slots=True, eq=False)
class ChangeOrder:
    """One change order. ``status_at(now)`` is its status; nothing else moves it."""

    change_order_id: str
    app_id: str
    base_status: int
    created_at: float
    rollback_s: float
    support_rollback: bool
    co_type: str
    description: str
    pipeline_id: str
    aborted_at: float | None = None

    def status_at(self, now: float) -> int:
        """The status at time ``now``: the created status, or 1 then 6 once aborted."""
        if self.aborted_at is None:
            return self.base_status
        if now < self.aborted_at + self.rollback_s:
            return int(CoStatus.RUNNING)
        return int(CoStatus.ABORT)

    def finished_at(self, now: float) -> float | None:
        """When the order became terminal, or ``None`` while it is not (yet) terminal."""
        if self.aborted_at is not None:
            done = self.aborted_at + self.rollback_s
            return done if now >= done else None
        return self.created_at if self.base_status in TERMINAL_STATUSES else None

    def snapshot(self, now: float) -> dict[str, Any]:
        """The control API's view (``GET /_sim/change-orders/{id}``)."""
        status = self.status_at(now)
        return {
            "change_order_id": self.change_order_id,
            "app_id": self.app_id,
            "status": status,
            "status_name": LAST_STATUS_NAMES.get(status, str(status)),
            "running": status not in TERMINAL_STATUSES,
            "support_rollback": self.support_rollback,
            "co_type": self.co_type,
            "rollback_s": self.rollback_s,
            "created_at": self.created_at,
            "aborted_at": self.aborted_at,
            "finished_at": self.finished_at(now),
        }


@dataclass(slots=True, eq=False)
class App:
    """An application: its change orders (oldest first), its one live order, its busy window."""

    app_id: str
    created_at: float
    orders: list[ChangeOrder] = field(default_factory=list)
    active: ChangeOrder | None = None
    busy_until: float = 0.0

    def live_order(self, now: float) -> ChangeOrder | None:
        """The app's non-terminal change order at ``now``, if any (forgets finished ones)."""
        order = self.active
        if order is not None and order.status_at(now) in TERMINAL_STATUSES:
            self.active = order = None
        return order

    def last_order(self, now: float) -> ChangeOrder | None:
        """The order DescribeApplicationStatus reports: the live one, else the newest."""
        live = self.live_order(now)
        if live is not None:
            return live
        return self.orders[-1] if self.orders else None


@dataclass(slots=True)
class CallRecord:
    """One API call the simulator received (``GET /_sim/calls``)."""

    action: str
    path: str
    change_order_id: str | None
    app_id: str | None
    access_key_id: str | None
    http_status: int | None
    code: str | None
    request_id: str
    trace_id: str | None
    at: float
    accepted: bool = False
    fault: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON object of this record."""
        return {
            "action": self.action,
            "path": self.path,
            "change_order_id": self.change_order_id,
            "app_id": self.app_id,
            "access_key_id": self.access_key_id,
            "http_status": self.http_status,
            "code": self.code,
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "at": self.at,
            "accepted": self.accepted,
            "fault": self.fault,
        }


class CallBudget:
    """At most ``per_minute`` calls in any sliding 60 s window (the account-wide SAE budget).

    A log of accepted call times, oldest first; expired entries are dropped from the left, so
    each call costs amortized O(1). Refused calls do not consume the budget.
    """

    WINDOW_S: Final = 60.0

    def __init__(self, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._times: deque[float] = deque()

    def try_acquire(self, now: float) -> bool:
        """Count a call at ``now`` if the window has room; ``False`` means throttle it."""
        times = self._times
        horizon = now - self.WINDOW_S
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) >= self.per_minute:
            return False
        times.append(now)
        return True


class SimState:
    """Apps, change orders, the call log and the seeded id source. Single event loop, no locks."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        seed: int | None = None,
        calls_per_minute: int | None = None,
        max_calls: int = 200_000,
    ) -> None:
        self.clock: Callable[[], float] = clock if clock is not None else time.time
        # A seeded RNG makes request ids, trace ids and generated order ids reproducible; the
        # ids only need to be unique, not unpredictable.
        self._rng = random.Random(seed)
        self.apps: dict[str, App] = {}
        self.orders: dict[str, ChangeOrder] = {}
        self.budget = CallBudget(calls_per_minute) if calls_per_minute is not None else None
        # Bounded so a long benchmark cannot grow memory without limit; the oldest fall off.
        self.calls: deque[CallRecord] = deque(maxlen=max_calls)
        self.calls_total = 0

    # ids --------------------------------------------------------------------------------

    def new_request_id(self) -> str:
        """A UUID-shaped upper-hex request id, e.g. ``91F93257-7A4A-4BD3-9A7E-2F6EAE6D12AB``."""
        h = f"{self._rng.getrandbits(128):032X}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def new_trace_id(self) -> str:
        """A 30-character lower-hex trace id, like ``0a98a02315955564772843261e1234``."""
        return f"{self._rng.getrandbits(120):030x}"

    def new_change_order_id(self) -> str:
        """A UUID-shaped lower-hex change-order id, like SAE's."""
        h = f"{self._rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    # control ----------------------------------------------------------------------------

    def ensure_app(self, app_id: str) -> App:
        """The app ``app_id``, created on first mention."""
        app = self.apps.get(app_id)
        if app is None:
            app = self.apps[app_id] = App(app_id=app_id, created_at=self.clock())
        return app

    def create_change_order(
        self,
        app_id: str,
        *,
        change_order_id: str | None = None,
        status: int = CoStatus.RUNNING,
        rollback_s: float = 1.0,
        support_rollback: bool = True,
        co_type: str = "CoDeploy",
        description: str = "",
    ) -> ChangeOrder:
        """Create a change order (and its app). :class:`ControlError` on a conflict or bad value."""
        if not app_id:
            raise ControlError("InvalidParameter", "app_id must be a non-empty string")
        if status not in LAST_STATUS_NAMES:
            raise ControlError("InvalidParameter", f"status {status} is not a change-order status")
        if not math.isfinite(rollback_s) or rollback_s < 0:
            raise ControlError("InvalidParameter", "rollback_s must be a finite number >= 0")
        if change_order_id is None:
            change_order_id = self.new_change_order_id()
        elif not change_order_id:
            raise ControlError("InvalidParameter", "change_order_id must be a non-empty string")
        if change_order_id in self.orders:
            raise ControlError(
                "Conflict", f"change order {change_order_id!r} already exists", http_status=409
            )
        now = self.clock()
        app = self.ensure_app(app_id)
        live = status not in TERMINAL_STATUSES
        if live:
            current = app.live_order(now)
            if current is not None:
                raise ControlError(
                    "Application.ChangerOrderRunning",
                    f"app {app_id!r} already has a running change order "
                    f"{current.change_order_id!r}; SAE runs one change order per app",
                    http_status=409,
                )
        order = ChangeOrder(
            change_order_id=change_order_id,
            app_id=app_id,
            base_status=int(status),
            created_at=now,
            rollback_s=float(rollback_s),
            support_rollback=support_rollback,
            co_type=co_type,
            description=description,
            pipeline_id=self.new_change_order_id(),
        )
        self.orders[change_order_id] = order
        app.orders.append(order)
        if live:
            app.active = order
        return order

    def set_busy(self, app_id: str, seconds: float) -> App:
        """Another change holds ``app_id`` for ``seconds`` from now (0 clears it)."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ControlError("InvalidParameter", "seconds must be a finite number >= 0")
        app = self.ensure_app(app_id)
        app.busy_until = self.clock() + seconds
        return app

    def reset(self) -> None:
        """Forget every app, order and recorded call (the RNG keeps its position)."""
        self.apps.clear()
        self.orders.clear()
        self.calls.clear()
        self.calls_total = 0
        if self.budget is not None:
            self.budget = CallBudget(self.budget.per_minute)

    # API --------------------------------------------------------------------------------

    def order(self, change_order_id: str | None) -> ChangeOrder:
        """The order with that id, or the SAE error for a missing or unknown id."""
        if not change_order_id:
            raise api_error("InvalidParameter.NotEmpty", "ChangeOrderId")
        order = self.orders.get(change_order_id)
        if order is None:
            raise api_error("InvalidChangeOrder.NotFound")
        return order

    def app(self, app_id: str | None) -> App:
        """The app with that id, or the SAE error for a missing or unknown id."""
        if not app_id:
            raise api_error("InvalidParameter.NotEmpty", "AppId")
        app = self.apps.get(app_id)
        if app is None:
            raise api_error("InvalidAppId.NotFound")
        return app

    def abort_and_rollback(self, change_order_id: str | None) -> ChangeOrder:
        """Accept an AbortAndRollbackChangeOrder, or raise the SAE error (module docstring)."""
        order = self.order(change_order_id)
        now = self.clock()
        # An order already aborted counts as not running even while its rollback still shows
        # status 1: the rollback itself cannot be aborted again.
        if order.aborted_at is not None or order.base_status in TERMINAL_STATUSES:
            raise api_error("Application.ChangerOrder.Not.Running")
        if not order.support_rollback:
            raise api_error(
                "InvalidParameter.WithMessage",
                "ChangeOrderId",
                "the change order does not support rollback",
            )
        app = self.apps[order.app_id]
        if now < app.busy_until:
            raise api_error("Application.ChangerOrderRunning")
        order.aborted_at = now
        return order

    def list_change_orders(
        self,
        app_id: str | None,
        *,
        co_status: int | None = None,
        co_type: str | None = None,
        key: str | None = None,
        page: int = 1,
        page_size: int = 10,
        reverse: bool = False,
    ) -> tuple[list[ChangeOrder], int]:
        """One page of an app's orders, newest first (``reverse`` = oldest first), and the total."""
        app = self.app(app_id)
        now = self.clock()
        matching: Iterator[ChangeOrder] = iter(app.orders if reverse else reversed(app.orders))
        if co_status is not None:
            matching = (o for o in matching if o.status_at(now) == co_status)
        if co_type:
            matching = (o for o in matching if o.co_type == co_type)
        if key:
            matching = (o for o in matching if key in o.change_order_id or key in o.description)
        selected = list(matching)
        start = (page - 1) * page_size
        return selected[start : start + page_size], len(selected)

    # call log ---------------------------------------------------------------------------

    def record(self, call: CallRecord) -> None:
        """Append ``call`` to the bounded call log."""
        self.calls.append(call)
        self.calls_total += 1

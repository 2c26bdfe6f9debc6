"""A scripted in-memory SAE for the worker's unit tests (not a test module).

:class:`FakeSae` has the four calls the worker makes. Each change order has a status; an
accepted abort sets it to ``after_abort_status`` (6 by default). Per-action scripts override
the default answer of the next calls: an exception instance is raised, a callable is called
with the call's argument. Builders (:func:`busy`, :func:`server_error` ...) make the exact
classified errors the real client raises, each with a ``CallOutcome``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from orchestrator.metrics import Metrics
from orchestrator.sae import TransportKind
from orchestrator.sae.errors import SaeCallError, SaeTransportError, classify, error_for
from orchestrator.sae.models import (
    AbortResult,
    AppStatus,
    CallOutcome,
    ChangeOrder,
    ChangeOrderPage,
    parse_app_status,
    parse_change_order,
    parse_change_order_page,
)
from orchestrator.store import Store, open_store

ABORT = "AbortAndRollbackChangeOrder"
DESCRIBE = "DescribeChangeOrder"
LIST = "ListChangeOrders"
APP_STATUS = "DescribeApplicationStatus"
TERMINAL = frozenset({2, 3, 6, 10})

_ids = itertools.count(1)


def outcome(
    action: str, http_status: int | None = 200, code: str = "Success", **extra: Any
) -> CallOutcome:
    """A call outcome with fresh request/trace ids (none when no answer came)."""
    n = next(_ids)
    answered = http_status is not None
    classification = None
    if code != "Success":
        classification = classify(http_status, None if code == "Transport" else code)
    return CallOutcome(
        action=action,
        http_status=http_status,
        code=code,
        error_code=None,
        message=extra.pop("message", None if code == "Success" else f"simulated {code}"),
        request_id=f"REQ-{n}" if answered else None,
        trace_id=f"trace{n}" if answered else None,
        duration_s=extra.pop("duration_s", 0.001),
        started_at=datetime.now(UTC),
        classification=classification,
        retry_after_s=extra.pop("retry_after_s", None),
    )


def failure(action: str, http_status: int, code: str, **extra: Any) -> SaeCallError:
    """The classified error for an answered failure."""
    return error_for(outcome(action, http_status, code, **extra))


def busy(action: str = ABORT) -> SaeCallError:
    """Application.ChangerOrderRunning."""
    return failure(action, 400, "Application.ChangerOrderRunning")


def throttled(action: str = ABORT, retry_after_s: float | None = None) -> SaeCallError:
    """Throttling.User."""
    return failure(action, 400, "Throttling.User", retry_after_s=retry_after_s)


def server_error(action: str = ABORT) -> SaeCallError:
    """503 ServiceUnavailable (ambiguous)."""
    return failure(action, 503, "ServiceUnavailable")


def not_running(action: str = ABORT) -> SaeCallError:
    """Application.ChangerOrder.Not.Running."""
    return failure(action, 400, "Application.ChangerOrder.Not.Running")


def permanent(action: str = ABORT, code: str = "Resouce.no.permission") -> SaeCallError:
    """A permanent refusal."""
    return failure(action, 400, code)


def transport(
    action: str = ABORT, kind: TransportKind = TransportKind.READ_TIMEOUT
) -> SaeCallError:
    """No answer (read timeout by default: ambiguous)."""
    return SaeTransportError(outcome(action, None, "Transport"), kind)


class FakeSae:
    """In-memory change orders with per-action scripted answers (see module docstring)."""

    def __init__(self, *, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        #: Extra latency per action (seconds), e.g. a slow abort.
        self.slow: dict[str, float] = {}
        self.status: dict[str, int] = {}
        self.app_of: dict[str, str] = {}
        self.support: dict[str, bool] = {}
        self.error_message: dict[str, str] = {}
        self.after_abort_status = 6
        self.scripts: dict[str, list[Any]] = defaultdict(list)
        self.calls: list[tuple[str, str]] = []
        self.accepted: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        #: Set while a call is in flight (tests wait on it to act mid-call).
        self.call_started = asyncio.Event()

    def order(
        self, change_order_id: str, app_id: str, status: int = 1, *, support_rollback: bool = True
    ) -> None:
        """Create (or reset) a change order."""
        self.status[change_order_id] = status
        self.app_of[change_order_id] = app_id
        self.support[change_order_id] = support_rollback

    def then(self, action: str, *answers: Any) -> None:
        """Queue scripted answers for the next calls of ``action``."""
        self.scripts[action].extend(answers)

    def count(self, action: str) -> int:
        """How many calls of ``action`` were made."""
        return sum(1 for a, _ in self.calls if a == action)

    async def _enter(self, action: str, arg: str) -> Any:
        self.calls.append((action, arg))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.call_started.set()
        try:
            delay = self.slow.get(action, self.latency_s)
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.in_flight -= 1
        script = self.scripts[action]
        if script:
            answer = script.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            if callable(answer):
                return answer(arg)
        return None

    async def abort_and_rollback(self, change_order_id: str) -> AbortResult:
        scripted = await self._enter(ABORT, change_order_id)
        if isinstance(scripted, AbortResult):
            return scripted
        if change_order_id not in self.status:
            raise permanent(ABORT, "InvalidChangeOrder.NotFound")
        if self.status[change_order_id] in TERMINAL or change_order_id in self.accepted:
            raise not_running()
        self.accepted.append(change_order_id)
        self.status[change_order_id] = self.after_abort_status
        return AbortResult(change_order_id, outcome(ABORT))

    async def describe_change_order(self, change_order_id: str) -> ChangeOrder:
        scripted = await self._enter(DESCRIBE, change_order_id)
        if isinstance(scripted, ChangeOrder):
            return scripted
        if change_order_id not in self.status:
            raise permanent(DESCRIBE, "InvalidChangeOrder.NotFound")
        return parse_change_order(
            {
                "ChangeOrderId": change_order_id,
                "AppId": self.app_of[change_order_id],
                "Status": self.status[change_order_id],
                "SupportRollback": self.support[change_order_id],
                "ErrorMessage": self.error_message.get(change_order_id, ""),
            },
            outcome(DESCRIBE),
        )

    async def list_change_orders(
        self,
        app_id: str,
        co_status: int | None = None,
        page: int = 1,
        page_size: int = 20,
        co_type: str | None = None,
    ) -> ChangeOrderPage:
        await self._enter(LIST, app_id)
        items = [
            {"ChangeOrderId": co, "AppId": app, "Status": self.status[co]}
            for co, app in reversed(self.app_of.items())
            if app == app_id
        ]
        return parse_change_order_page({"ChangeOrderList": items}, outcome(LIST))

    async def describe_application_status(self, app_id: str) -> AppStatus:
        await self._enter(APP_STATUS, app_id)
        mine = [co for co, app in self.app_of.items() if app == app_id]
        last = mine[-1] if mine else ""
        running = bool(last) and self.status[last] not in TERMINAL
        return parse_app_status(
            {"AppId": app_id, "LastChangeOrderId": last, "LastChangeOrderRunning": running},
            outcome(APP_STATUS),
        )


async def sqlite(tmp_path: Path) -> Store:
    """A migrated, opened SQLite store in ``tmp_path``."""
    store = open_store(f"sqlite:///{tmp_path / 'unit.db'}")
    await store.open(migrate=True)
    return store


def metrics() -> Metrics:
    """Metrics on a fresh registry."""
    return Metrics(CollectorRegistry())


def sample(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample value (0 when absent)."""
    value = m.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


Answer = BaseException | Callable[[str], Any]

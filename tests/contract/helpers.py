"""Small builders shared by the contract tests."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from orchestrator.jobs import AttemptIn, AttemptOutcome, Claimed, NewJob
from orchestrator.store import Store

_counter = itertools.count(1)


def new_job(
    change_order_id: str | None = "auto", app_id: str | None = "app-1", **kw: Any
) -> NewJob:
    """A ``NewJob``; ``change_order_id="auto"`` makes a unique one."""
    if change_order_id == "auto":
        change_order_id = f"co-{next(_counter)}"
    kw.setdefault("region", "cn-hangzhou")
    kw.setdefault("source", "api")
    return NewJob(change_order_id=change_order_id, app_id=app_id, **kw)


def attempt(outcome: AttemptOutcome = AttemptOutcome.RETRY, **kw: Any) -> AttemptIn:
    """An ``AttemptIn`` as the worker would report an AbortAndRollback call."""
    kw.setdefault("action", "AbortAndRollbackChangeOrder")
    kw.setdefault("started_at", datetime.now(UTC))
    kw.setdefault("duration_ms", 41)
    kw.setdefault("http_status", 400)
    kw.setdefault("code", "Application.ChangerOrderRunning")
    kw.setdefault("message", "busy")
    kw.setdefault("request_id", "req-1")
    kw.setdefault("trace_id", "trace-1")
    return AttemptIn(outcome=outcome, **kw)


async def claim_one(store: Store, owner: str = "w1", lease_s: float = 30.0) -> Claimed:
    """Claim exactly one job (fails the test otherwise)."""
    claimed = await store.claim(owner, lease_s, 1)
    assert len(claimed) == 1, claimed
    return claimed[0]

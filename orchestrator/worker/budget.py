"""The account-wide SAE call budget: every call of every job spends one token first.

SAE allows 60 calls per minute per account, all actions together; a worker that exceeds it
gets ``Throttling.User`` and wastes the calls. ``[sae] calls_per_minute`` sets the budget
(0 = none). One token bucket implements it, refilled at ``calls_per_minute - burst`` per
minute: even a full bucket emptied at once then keeps every sliding 60 s window within
``calls_per_minute`` (a plain bucket at the full rate would allow ``burst`` extra calls in
the first minute, which a sliding-window limiter like SAE's answers with throttling).

Priorities: waiting callers are served strictly by :class:`Priority` (first calls of new
jobs, then retries, then verification polls), oldest first within a priority. Only the
head of that queue takes tokens, and a higher-priority arrival becomes the new head at
once, so polls and retries use whatever first calls leave over (the budget stays fully
used) but can never make a new job's first call wait behind them. Retries of busy apps
limit themselves further (retry.py: at most half of the budget for all busy probes).

Where the tokens live depends on the engine: in memory for SQLite (one process), in the
database for PostgreSQL (``Store.take_call_tokens``), so the limit holds across all worker
processes sharing that database. Across processes the priority order is per process: each
process's head competes for the shared bucket, so a process with a first call waiting gets
its turn among the others (it is delayed by at most a few token periods, never starved).
A ``Throttling`` answer despite the budget (other clients use the same account) pauses this
process's calls for the answer's retry-after.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Final, Protocol

import tenacity

from orchestrator.errors import StoreUnavailable
from orchestrator.store.base import Store

__all__ = [
    "CallBudget",
    "LocalTokens",
    "Priority",
    "StoreTokens",
    "TokenSource",
    "bucket_shape",
    "make_budget",
]

#: Bucket name in the database (``call_budget`` table) for the PostgreSQL engine.
STORE_BUCKET: Final = "sae-calls"
#: Longest single wait before the head re-checks (also bounds a missed wake-up).
_MAX_WAIT_S: Final = 1.0


class Priority(IntEnum):
    """Who is asking for a call; lower values are served first."""

    #: A new job's calls up to and including its first abort: resolve, pre-check, abort.
    FIRST = 0
    #: Retries after a failure and the reconcile reads that precede them.
    RETRY = 1
    #: Verification polls of a rollback in progress.
    POLL = 2


def bucket_shape(calls_per_minute: float) -> tuple[float, float]:
    """``(refill per minute, burst)`` of the main bucket for a budget of ``calls_per_minute``.

    The burst is 5 % of the budget, between 1 and 10 calls; the refill is the budget minus
    the burst (never below half the budget), so no 60 s window ever sees more than the budget.
    """
    burst = min(10.0, max(1.0, calls_per_minute / 20.0))
    rate = max(calls_per_minute - burst, calls_per_minute / 2.0)
    return rate, burst


class TokenSource(Protocol):
    """Where tokens come from: ``take`` returns 0 when granted, else seconds to wait."""

    async def take(self) -> float:
        """Take one token, or say how long until one is there."""
        ...


class _Bucket:
    """A classic token bucket on an injected monotonic clock."""

    def __init__(self, rate_per_minute: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate_per_s = rate_per_minute / 60.0
        self.burst = burst
        self.tokens = burst
        self._clock = clock
        self._stamp = clock()

    def take(self) -> float:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now
        # The epsilon absorbs float rounding: a caller that slept exactly the wait it was
        # told must get its token, not a second wait of 1e-16 s.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class LocalTokens:
    """In-memory buckets: the budget of one process (the SQLite engine's case)."""

    def __init__(
        self, calls_per_minute: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        rate, burst = bucket_shape(calls_per_minute)
        self._bucket = _Bucket(rate, burst, clock)

    async def take(self) -> float:
        """Take a token now, or say how long until one is there."""
        return self._bucket.take()


class StoreTokens:
    """Buckets in the database, shared by every process using it (the PostgreSQL case)."""

    def __init__(self, store: Store, calls_per_minute: float) -> None:
        self._rate, self._burst = bucket_shape(calls_per_minute)
        self._store = store
        # A database hiccup should delay a call, not fail the job: a few quick retries.
        self._retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
            stop=tenacity.stop_after_attempt(5),
            reraise=True,
        )

    async def take(self) -> float:
        """One ``take_call_tokens`` round trip (retried on ``StoreUnavailable``)."""
        result: float = await self._retrying(
            self._store.take_call_tokens, STORE_BUCKET, self._rate, self._burst
        )
        return result


class CallBudget:
    """Grants call permits in priority order from a :class:`TokenSource`.

    ``CallBudget(None)`` is the unlimited budget (``calls_per_minute = 0``): ``acquire``
    returns at once.
    """

    def __init__(
        self,
        source: TokenSource | None,
        calls_per_minute: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self.calls_per_minute = calls_per_minute if source is not None else 0.0
        self._clock = clock
        self._queue: list[tuple[int, int]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self._paused_until = 0.0
        #: Permits granted, by priority (for tests and the benchmark report).
        self.granted: dict[Priority, int] = dict.fromkeys(Priority, 0)

    @property
    def limited(self) -> bool:
        """Whether calls are budgeted at all."""
        return self._source is not None

    def pause(self, seconds: float) -> None:
        """Hold every call of this process for ``seconds`` (after an unexpected throttling)."""
        if self._source is None or seconds <= 0:
            return
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        self._notify()

    def _notify(self) -> None:
        # Wake every waiter to re-check who is at the head; a fresh event for the next round.
        self._changed.set()
        self._changed = asyncio.Event()

    async def acquire(self, priority: Priority) -> float:
        """Wait for a permit to make one SAE call; return the seconds waited."""
        if self._source is None:
            self.granted[priority] += 1
            return 0.0
        started = self._clock()
        entry = (int(priority), next(self._seq))
        heapq.heappush(self._queue, entry)
        try:
            while True:
                changed = self._changed
                wait_s = 0.0
                if self._queue[0] == entry:
                    wait_s = self._paused_until - self._clock()
                    if wait_s <= 0:
                        wait_s = await self._source.take()
                        if wait_s <= 0:
                            self.granted[priority] += 1
                            return self._clock() - started
                else:
                    wait_s = _MAX_WAIT_S
                await _wait(changed.wait(), min(max(wait_s, 0.001), _MAX_WAIT_S))
        finally:
            # Leave the queue whether granted or cancelled, and let the next head move.
            with contextlib.suppress(ValueError):
                self._queue.remove(entry)
                heapq.heapify(self._queue)
            self._notify()


async def _wait(awaitable: Awaitable[object], timeout_s: float) -> None:
    """Wait for ``awaitable`` at most ``timeout_s`` seconds (a timeout is not an error)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, timeout_s)


def make_budget(store: Store, calls_per_minute: float) -> CallBudget:
    """The budget for this engine: in memory on SQLite, in the database on PostgreSQL."""
    if calls_per_minute <= 0:
        return CallBudget(None)
    source: TokenSource
    if store.engine == "postgresql":
        source = StoreTokens(store, calls_per_minute)
    else:
        source = LocalTokens(calls_per_minute)
    return CallBudget(source, calls_per_minute)

"""The call budget: bucket shape, pacing, priorities, pause, and the per-engine choice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from orchestrator.worker.budget import (
    CallBudget,
    LocalTokens,
    Priority,
    StoreTokens,
    bucket_shape,
    make_budget,
)

from .worker_fakes import sqlite


class ManualTokens:
    """A token source the test refills by hand."""

    def __init__(self) -> None:
        self.tokens = 0
        self.takes = 0

    async def take(self) -> float:
        self.takes += 1
        if self.tokens > 0:
            self.tokens -= 1
            return 0.0
        return 0.05


def test_bucket_shape_keeps_every_minute_within_budget() -> None:
    """Burst plus one minute of refill never exceeds calls_per_minute."""
    for cpm in (1, 6, 60, 600, 6000):
        rate, burst = bucket_shape(cpm)
        assert burst >= 1
        assert rate + burst <= cpm or rate == cpm / 2
        assert rate > 0
    assert bucket_shape(60) == (57.0, 3.0)
    assert bucket_shape(600) == (590.0, 10.0)


async def test_local_tokens_pace_at_the_refill_rate() -> None:
    """After the burst, tokens come at the refill rate (fake clock)."""
    now = [0.0]
    tokens = LocalTokens(60, clock=lambda: now[0])  # burst 3, 57 per minute
    assert [await tokens.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = await tokens.take()
    assert wait == pytest.approx(60 / 57)
    now[0] += wait
    assert await tokens.take() == 0.0


async def test_unlimited_budget_grants_at_once() -> None:
    """calls_per_minute = 0: no waiting at all."""
    budget = CallBudget(None)
    assert not budget.limited
    assert await budget.acquire(Priority.POLL) == 0.0
    assert budget.granted[Priority.POLL] == 1


async def test_real_budget_paces_calls() -> None:
    """At 1200 calls/min (burst 10, 20/s refill less the burst) 20 calls take about 0.5 s."""
    budget = CallBudget(LocalTokens(1200), 1200)
    started = time.monotonic()
    for _ in range(20):
        await budget.acquire(Priority.FIRST)
    elapsed = time.monotonic() - started
    rate, burst = bucket_shape(1200)
    assert elapsed == pytest.approx((20 - burst) * 60 / rate, abs=0.15)


async def test_first_calls_go_before_waiting_polls() -> None:
    """Polls queued first still wait while a new job's first call is waiting."""
    source = ManualTokens()
    budget = CallBudget(source, 60)
    order: list[str] = []

    async def take(name: str, priority: Priority) -> None:
        await budget.acquire(priority)
        order.append(name)

    polls = [asyncio.create_task(take(f"poll{i}", Priority.POLL)) for i in range(3)]
    await asyncio.sleep(0.01)
    retry = asyncio.create_task(take("retry", Priority.RETRY))
    first = asyncio.create_task(take("first", Priority.FIRST))
    await asyncio.sleep(0.01)
    for _ in range(5):
        source.tokens += 1
        await asyncio.sleep(0.1)
    await asyncio.wait_for(asyncio.gather(*polls, retry, first), 2)
    assert order == ["first", "retry", "poll0", "poll1", "poll2"]


async def test_cancelled_waiter_leaves_the_queue() -> None:
    """A waiter cancelled while queued does not block the ones behind it."""
    source = ManualTokens()
    budget = CallBudget(source, 60)
    head = asyncio.create_task(budget.acquire(Priority.FIRST))
    behind = asyncio.create_task(budget.acquire(Priority.POLL))
    await asyncio.sleep(0.01)
    head.cancel()
    source.tokens = 1
    assert await asyncio.wait_for(behind, 2) >= 0
    assert budget.granted[Priority.FIRST] == 0


async def test_pause_holds_calls() -> None:
    """After an unexpected throttling the process holds its calls for the retry-after."""
    budget = CallBudget(LocalTokens(6000), 6000)
    budget.pause(0.3)
    started = time.monotonic()
    await budget.acquire(Priority.FIRST)
    assert time.monotonic() - started >= 0.28


async def test_engine_decides_where_tokens_live(tmp_path: Path) -> None:
    """SQLite keeps the budget in memory; PostgreSQL would share it in the database."""
    store = await sqlite(tmp_path)
    try:
        assert not make_budget(store, 0).limited
        local = make_budget(store, 60)
        assert isinstance(local._source, LocalTokens)
        store.engine = "postgresql"  # type: ignore[misc]
        shared = make_budget(store, 60)
        assert isinstance(shared._source, StoreTokens)
    finally:
        await store.close()


async def test_store_tokens_use_the_shared_bucket(tmp_path: Path) -> None:
    """The database bucket grants its burst, then asks to wait (any engine implements it)."""
    store = await sqlite(tmp_path)
    try:
        tokens = StoreTokens(store, 60)
        waits = [await tokens.take() for _ in range(4)]
        assert waits[:3] == [0.0, 0.0, 0.0]
        assert waits[3] > 0.5
    finally:
        await store.close()

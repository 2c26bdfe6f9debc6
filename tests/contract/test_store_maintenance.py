"""Store housekeeping: planner statistics exist once the worker's maintenance ran."""

from __future__ import annotations

import asyncpg

from orchestrator.store import Store
from tests.contract.engines import Engine
from tests.contract.helpers import claim_one, new_job


async def test_maintain_keeps_the_store_usable(store: Store) -> None:
    """maintain() runs on a store with a backlog and the store works on afterwards."""
    for i in range(60):
        await store.enqueue(new_job(change_order_id=f"co-{i}", app_id=f"app-{i}"))
    await store.maintain()
    claimed = await claim_one(store)
    assert claimed.job.change_order_id is not None
    assert (await store.stats()).counts


async def test_postgres_jobs_table_gets_statistics(engine: Engine, store: Store) -> None:
    """On PostgreSQL a jobs table that was never analyzed gets its statistics."""
    if engine.name != "postgresql":
        return  # SQLite's PRAGMA optimize decides for itself; nothing to observe
    for i in range(60):
        await store.enqueue(new_job(change_order_id=f"co-{i}", app_id=f"app-{i}"))
    conn = await asyncpg.connect(
        engine.url, server_settings={"search_path": engine.tuning["schema"]}
    )
    try:
        reltuples = "SELECT reltuples FROM pg_class WHERE oid = 'jobs'::regclass"
        assert await conn.fetchval(reltuples) < 0  # never analyzed: -1
        assert await store.maintain() is True
        assert await conn.fetchval(reltuples) == 60
    finally:
        await conn.close()

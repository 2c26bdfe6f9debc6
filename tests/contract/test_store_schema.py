"""Contract: migrations, schema checks at open, lifecycle — on every engine.

The migration test compares a catalog dump of a database migrated step by step (stopping
at every intermediate version, with data written at each stop) with one migrated in one
go. With only 0001 today the stepwise path is "empty → 1"; the mechanism is what keeps a
future 0002 honest (it must upgrade a populated version-1 database to exactly the fresh
schema).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from orchestrator.errors import SchemaError, StoreError
from orchestrator.store import Store, sqlite_queries
from orchestrator.store.base import load_migrations
from tests.contract.engines import Engine, engine_for, pg_dsn_or_skip, pg_schema
from tests.contract.helpers import new_job

_PG_DUMP = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' null='
       || is_nullable || ' default=' || coalesce(column_default, '') || ' identity='
       || is_identity
FROM information_schema.columns WHERE table_schema = current_schema()
UNION ALL
SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes
WHERE schemaname = current_schema()
UNION ALL
SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' '
       || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = current_schema()::regnamespace
UNION ALL
SELECT 'trigger ' || event_object_table || ' ' || trigger_name || ' ' || action_statement
FROM information_schema.triggers WHERE trigger_schema = current_schema()
UNION ALL
SELECT 'function ' || p.proname || ' ' || pg_get_functiondef(p.oid)
FROM pg_proc AS p WHERE p.pronamespace = current_schema()::regnamespace
"""


async def _dump(engine: Engine) -> list[str]:
    """The schema as sorted text lines, with the engine's own naming noise removed."""
    if engine.name == "sqlite":
        path = engine.url.removeprefix("sqlite:///")
        conn = sqlite3.connect(path)
        try:
            rows = conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master"
                " WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
            ).fetchall()
        finally:
            conn.close()
        return [" ".join(str(x) for x in row) for row in rows]
    schema = engine.tuning["schema"]
    conn = await asyncpg.connect(engine.url, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch(_PG_DUMP)
    finally:
        await conn.close()
    return sorted(re.sub(rf"\b{schema}\.", "", r[0]) for r in rows)


async def _write_sample_data(engine: Engine, version: int) -> None:
    """Rows a real deployment would have at ``version`` (only version 1 exists so far)."""
    if version == 0:
        return
    store = engine.new_store()
    await store.open()
    try:
        await store.enqueue(new_job(f"co-v{version}", "app-1", idempotency_key=f"k{version}"))
        await store.record_rejection("api", "sample", {})
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_stepwise_migration_yields_the_same_schema_as_a_fresh_one(
    kind: str, tmp_path: Path
) -> None:
    """Stopping at every version (with data) then migrating on gives the fresh schema."""
    latest = len(load_migrations("sqlite" if kind == "sqlite" else "postgres"))
    async with engine_for(kind, tmp_path / "fresh") as fresh:
        applied = await fresh.new_store().migrate()
        assert len(applied) == latest
        expected = await _dump(fresh)
    assert any("jobs_one_active_per_app" in line for line in expected)
    for stop in range(latest):
        step_dir = tmp_path / f"stop{stop}"
        step_dir.mkdir()
        async with engine_for(kind, step_dir) as stepped:
            first = await stepped.new_store().migrate(target=stop)
            assert len(first) == stop
            await _write_sample_data(stepped, stop)
            rest = await stepped.new_store().migrate()
            assert len(rest) == latest - stop
            assert await _dump(stepped) == expected
            assert await stepped.new_store().schema_version() == latest


async def test_migrate_is_idempotent_and_reports_what_it_applied(engine: Engine) -> None:
    """The first run applies every migration by name, the second applies nothing."""
    store = engine.new_store()
    assert await store.schema_version() == 0
    names = await store.migrate()
    expected = [
        m.name for m in load_migrations("sqlite" if engine.name == "sqlite" else "postgres")
    ]
    assert names == expected
    assert names[0] == "0001_initial"
    assert await store.migrate() == []
    assert await store.schema_version() == len(expected)
    await store.close()  # never opened: closing is still fine


async def test_open_refuses_an_unmigrated_store(engine: Engine) -> None:
    """Opening before ``migrate`` is a SchemaError naming the fix."""
    store = engine.new_store()
    with pytest.raises(SchemaError, match="migrate"):
        await store.open()
    await store.close()


async def test_open_refuses_a_schema_newer_than_this_code(engine: Engine) -> None:
    """A database migrated by a newer release is refused rather than misread."""
    store = engine.new_store()
    await store.migrate()
    if engine.name == "sqlite":
        conn = sqlite3.connect(engine.url.removeprefix("sqlite:///"))
        conn.execute("INSERT INTO schema_migrations VALUES (999, '0999_future', 0)")
        conn.commit()
        conn.close()
    else:
        conn2 = await asyncpg.connect(
            engine.url, server_settings={"search_path": engine.tuning["schema"]}
        )
        await conn2.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'f')")
        await conn2.close()
    with pytest.raises(SchemaError, match="newer"):
        await store.open()
    with pytest.raises(SchemaError, match="newer"):
        await store.migrate()


async def test_open_with_migrate_sets_up_a_new_store(engine: Engine) -> None:
    """``open(migrate=True)`` is the zero-setup path; ``async with`` opens and closes."""
    store = engine.new_store()
    await store.open(migrate=True)
    await store.ping()
    await store.close()
    async with engine.new_store() as again:
        await again.ping()
        assert (await again.enqueue(new_job())).job.id


async def test_a_closed_store_refuses_work(store: Store) -> None:
    """After ``close()`` operations raise StoreError instead of touching a dead connection."""
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError):
        await store.enqueue(new_job())
    with pytest.raises(StoreError):
        await store.get("x")


async def test_the_sqlite_file_uses_wal_and_full_sync(tmp_path: Path) -> None:
    """Durability settings of the embedded engine: WAL journal, synchronous=FULL."""
    async with engine_for("sqlite", tmp_path) as engine:
        store = await engine.opened()
        try:
            conn = sqlite3.connect(engine.url.removeprefix("sqlite:///"))
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            conn.close()
            assert "PRAGMA synchronous = FULL" in sqlite_queries.PRAGMAS
            assert "PRAGMA foreign_keys = ON" in sqlite_queries.PRAGMAS
        finally:
            await store.close()


@pytest.mark.postgres
async def test_two_schemas_in_one_postgres_database_are_separate_stores() -> None:
    """The ``schema`` option isolates stores (the tests rely on it, and so may deployments)."""
    dsn = pg_dsn_or_skip()
    async with pg_schema(dsn) as a, pg_schema(dsn) as b:
        sa, sb = Engine("postgresql", dsn, {"schema": a}), Engine("postgresql", dsn, {"schema": b})
        s1, s2 = await sa.opened(), await sb.opened()
        try:
            await s1.enqueue(new_job("co-1"))
            assert (await s2.list_jobs()).items == ()
            assert not (await s2.enqueue(new_job("co-1"))).deduplicated
        finally:
            await s1.close()
            await s2.close()

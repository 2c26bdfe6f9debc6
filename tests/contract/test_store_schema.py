"""Contract: migrations, schema checks at open, lifecycle — on every engine.

The migration test compares a catalog dump of a database migrated step by step (stopping
at every intermediate version, with data written at each stop) with one migrated in one
go: 0002 must upgrade a populated version-1 database to exactly the fresh schema. The
data written at a stop is plain SQL of that version (the store code only speaks the
latest schema), and what 0002 backfills from it is checked after the upgrade.
"""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime
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


# Version-1 rows as a version-1 deployment would hold them: a job that was rescued twice
# after two calls (the worker counted those rescues in the audit trail), and a fresh one.
_V1_T0_US = 1_900_000_000_000_000  # 2030-03-17T17:46:40Z
_V1_FIRST_CALL_US = _V1_T0_US + 250_000
_V1_ROWS = [
    (
        "INSERT INTO jobs (id, change_order_id, app_id, region, status, source, created_at,"
        " updated_at, next_attempt_at, attempt_count, call_count, needs_reconcile)"
        " VALUES ('j-rescued', 'co-v1', 'app-1', 'cn-hangzhou', 'waiting', 'api', {t0}, {t0},"
        " {t0}, 4, 2, {true})"
    ),
    (
        "INSERT INTO jobs (id, change_order_id, app_id, region, status, source, created_at,"
        " updated_at, next_attempt_at) VALUES ('j-fresh', 'co-v1b', 'app-2', 'cn-hangzhou',"
        " 'queued', 'api', {t0}, {t0}, {t0})"
    ),
    (
        "INSERT INTO attempts (job_id, number, run, action, started_at, duration_ms, outcome)"
        " VALUES ('j-rescued', 2, 3, 'AbortAndRollbackChangeOrder', {t2}, 40, 'retry'),"
        " ('j-rescued', 1, 1, 'DescribeChangeOrder', {t1}, 30, 'success')"
    ),
    (
        "INSERT INTO audit_events (job_id, at, event, actor, detail) VALUES"
        " ('j-rescued', {t0}, 'claimed', 'w1', '{{}}'),"
        " ('j-rescued', {t0}, 'rescued', 'w1', '{{}}'),"
        " ('j-rescued', {t0}, 'rescued', 'w2', '{{}}'), (NULL, {t0}, 'rejected', 'api', '{{}}')"
    ),
    "INSERT INTO idempotency_keys (source, key, job_id, created_at) VALUES"
    " ('api', 'k1', 'j-fresh', {t0})",
]


def _v1_time(engine: Engine, us: int) -> str:
    if engine.name == "sqlite":
        return str(us)
    return f"to_timestamp({us / 1_000_000!r})"


async def _execute(engine: Engine, statements: list[str]) -> None:
    """Run raw SQL on the engine's database (below the store, like an older release would)."""
    if engine.name == "sqlite":
        conn = sqlite3.connect(engine.url.removeprefix("sqlite:///"))
        try:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(engine.url, server_settings={"search_path": engine.tuning["schema"]})
    try:
        for statement in statements:
            await pg.execute(statement)
    finally:
        await pg.close()


async def _write_sample_data(engine: Engine, version: int) -> None:
    """Rows a real deployment would have at ``version`` (written in that version's SQL)."""
    if version == 0:
        return
    if version != 1:
        raise AssertionError(f"no sample data for version {version}: add it with the migration")
    values = {
        "t0": _v1_time(engine, _V1_T0_US),
        "t1": _v1_time(engine, _V1_FIRST_CALL_US),
        "t2": _v1_time(engine, _V1_FIRST_CALL_US + 5_000_000),
        "true": "1" if engine.name == "sqlite" else "true",
    }
    await _execute(engine, [row.format(**values) for row in _V1_ROWS])


async def _check_sample_data(engine: Engine, version: int) -> None:
    """What the migrations after ``version`` made of its sample rows."""
    if version != 1:
        return
    store = engine.new_store()
    await store.open()
    try:
        rescued, fresh = await store.get("j-rescued"), await store.get("j-fresh")
    finally:
        await store.close()
    assert (rescued.interrupted_count, fresh.interrupted_count) == (2, 0)
    first_call = datetime(2030, 3, 17, 17, 46, 40, 250000, tzinfo=UTC)
    assert (rescued.first_attempt_at, fresh.first_attempt_at) == (first_call, None)
    assert (rescued.attempt_count, rescued.call_count, len(rescued.attempts)) == (4, 2, 2)


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
            await _check_sample_data(stepped, stop)


async def test_open_refuses_a_version_1_store_until_it_is_migrated(engine: Engine) -> None:
    """A store left at version 1 by an older release: open says "migrate"; migrate=True does."""
    assert len(load_migrations("sqlite" if engine.name == "sqlite" else "postgres")) >= 2
    assert await engine.new_store().migrate(target=1) == ["0001_initial"]
    store = engine.new_store()
    with pytest.raises(
        SchemaError, match=r"version 1, this code needs \d+: run `sae-rollback migrate`"
    ):
        await store.open()
    await store.open(migrate=True)
    try:
        assert await store.schema_version() == len(
            load_migrations("sqlite" if engine.name == "sqlite" else "postgres")
        )
        job = (await store.enqueue(new_job())).job
        assert (job.interrupted_count, job.first_attempt_at) == (0, None)
    finally:
        await store.close()


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

"""Real store engines for tests: a SQLite file in tmp, or a fresh PostgreSQL schema.

PostgreSQL comes from ``SAE_ROLLBACK_TEST_PG_DSN``. Without it the PostgreSQL variants
skip, unless ``SAE_ROLLBACK_REQUIRE_PG=1`` (CI), where they fail loudly instead.
Isolation: every test gets its own schema (``search_path`` through the store's
``schema`` option), created empty and dropped afterwards — much cheaper than a database
per test, and migrations run for real in each one.

Also used by ``tests/integration/test_store_*.py`` (and their child processes).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orchestrator.store import Store, open_store

PG_DSN_ENV = "SAE_ROLLBACK_TEST_PG_DSN"
REQUIRE_PG_ENV = "SAE_ROLLBACK_REQUIRE_PG"


def pg_dsn_or_skip() -> str:
    """The test PostgreSQL DSN; skip (or fail, when required) if there is none."""
    dsn = os.environ.get(PG_DSN_ENV)
    if dsn:
        return dsn
    if os.environ.get(REQUIRE_PG_ENV) == "1":
        pytest.fail(f"{REQUIRE_PG_ENV}=1 but {PG_DSN_ENV} is not set", pytrace=False)
    pytest.skip(f"{PG_DSN_ENV} is not set")


@asynccontextmanager
async def pg_schema(dsn: str) -> AsyncIterator[str]:
    """A new empty schema, dropped (with everything in it) on exit."""
    name = f"t_{secrets.token_hex(6)}"
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get(REQUIRE_PG_ENV) == "1":
            pytest.fail(f"cannot reach PostgreSQL at {dsn}: {exc}", pytrace=False)
        pytest.skip(f"cannot reach PostgreSQL at {dsn}: {exc}")
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
        yield name
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await conn.close()


@dataclass
class Engine:
    """Where a store lives; ``new_store()`` makes another (unopened) store on the same data."""

    name: str
    url: str
    tuning: dict[str, Any] = field(default_factory=dict)

    def new_store(self, **extra: Any) -> Store:
        return open_store(self.url, **{**self.tuning, **extra})

    async def opened(self, **extra: Any) -> Store:
        """A migrated, opened store (the caller closes it)."""
        store = self.new_store(**extra)
        await store.open(migrate=True)
        return store


def sqlite_engine(tmp_path: Path, name: str = "store.db") -> Engine:
    # tmp_path is absolute, so this is the sqlite:////abs/path form
    return Engine("sqlite", f"sqlite:///{tmp_path / name}")


@asynccontextmanager
async def engine_for(kind: str, tmp_path: Path) -> AsyncIterator[Engine]:
    """An ``Engine`` of ``kind`` ("sqlite" / "postgres") with nothing in it yet."""
    if kind == "sqlite":
        yield sqlite_engine(tmp_path)
        return
    dsn = pg_dsn_or_skip()
    async with pg_schema(dsn) as schema:
        yield Engine("postgresql", dsn, {"schema": schema})

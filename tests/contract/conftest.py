"""Engine fixtures: every contract test runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.contract.engines import Engine, engine_for


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    """An empty database of each engine (a tmp SQLite file, or a fresh PostgreSQL schema)."""
    async with engine_for(request.param, tmp_path) as eng:
        yield eng


@pytest.fixture
async def store(engine: Engine) -> AsyncIterator[Store]:
    """A migrated, opened store on ``engine``."""
    s = await engine.opened()
    try:
        yield s
    finally:
        await s.close()

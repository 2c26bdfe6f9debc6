"""Unit tests of ``open_store`` (engine by URL, no I/O), cursors and the migration files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.store import InvalidCursor, open_store
from orchestrator.store.base import decode_cursor, encode_cursor, load_migrations
from orchestrator.store.postgres import PostgresStore
from orchestrator.store.sqlite import SqliteStore


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/sae-rollback.db", "var/sae-rollback.db"),
        ("sqlite:////srv/data/store.db", "/srv/data/store.db"),
        ("sqlite:///var/with%20space.db", "var/with space.db"),
    ],
)
def test_sqlite_urls_name_relative_or_absolute_files(url: str, path: str) -> None:
    """Three slashes: relative path; four: absolute path."""
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    assert store.engine == "sqlite"
    assert store.path == path


@pytest.mark.parametrize(
    "url", ["postgresql://u@127.0.0.1:5432/db", "postgres://u@127.0.0.1/db?sslmode=disable"]
)
def test_postgres_urls_open_the_postgres_engine(url: str) -> None:
    """Both spellings of the scheme select PostgreSQL; the DSN is not shown in repr."""
    store = open_store(url, max_size=4, schema="s1")
    assert isinstance(store, PostgresStore)
    assert store.engine == "postgresql"
    assert "127.0.0.1" not in repr(store)


def test_construction_does_no_io(tmp_path: Path) -> None:
    """Building a store touches no file and no socket."""
    target = tmp_path / "not" / "there.db"
    open_store(f"sqlite:///{target}")
    assert not target.parent.exists()
    open_store("postgresql://nobody@127.0.0.1:1/none")  # nothing listens on port 1


@pytest.mark.parametrize(
    "url", ["mysql://x/y", "redis://localhost", "/var/x.db", "sqlite:", "sqlite://", "sqlite:///"]
)
def test_unusable_urls_are_config_errors(url: str) -> None:
    """Unknown schemes and SQLite URLs without a file are refused with a hint."""
    with pytest.raises(ConfigError):
        open_store(url)


def test_sqlite_in_memory_is_refused() -> None:
    """An in-memory database cannot be shared by the writer and reader connections."""
    with pytest.raises(ConfigError, match="file path"):
        open_store("sqlite:///:memory:")


def test_unknown_tuning_options_are_config_errors() -> None:
    """A misspelt option is an error, not silently ignored; options are per engine."""
    with pytest.raises(ConfigError, match="busy_timeout"):
        open_store("sqlite:///x.db", busy_timeout=5)
    with pytest.raises(ConfigError, match="schema"):
        open_store("sqlite:///x.db", schema="s")
    with pytest.raises(ConfigError, match="max_size"):
        open_store("postgresql://h/db", max_size=0)


def test_a_missing_driver_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without asyncpg, choosing PostgreSQL says which package to install."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigError, match="install 'asyncpg'"):
        open_store("postgresql://h/db")


def test_cursors_round_trip_and_garbage_is_refused() -> None:
    """A cursor is opaque text that decodes to what was encoded; anything else is refused."""
    for seq in (0, 1, 987654321):
        assert decode_cursor(encode_cursor(seq)) == seq
    for bad in ("", "%%%", "ajE6", "eDE6MQ", "ajE6LTE"):  # j1: / x1:1 / j1:-1
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)
    assert issubclass(InvalidCursor, ValueError)


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_migrations_are_numbered_one_to_n(engine: str) -> None:
    """Each engine ships 0001.. with no gaps, so `migrate` can apply them in order."""
    migrations = load_migrations(engine)
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "0001_initial"
    assert all("CREATE" in m.sql for m in migrations[:1])

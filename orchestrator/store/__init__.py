"""The durable rollback store: ``open_store(url)`` picks the engine by URL scheme.

``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` open the embedded SQLite
engine; ``postgresql://…`` / ``postgres://…`` the PostgreSQL engine. Engine modules (and
their drivers) are imported only when chosen, with an install hint if the driver is
missing. Construction does no I/O: ``await store.open()`` (or ``async with store``).
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import unquote, urlsplit

from orchestrator.errors import ConfigError
from orchestrator.store.base import (
    AppBusy,
    DuplicateTarget,
    InvalidCursor,
    Store,
    TargetConflict,
)

__all__ = [
    "AppBusy",
    "DuplicateTarget",
    "InvalidCursor",
    "Store",
    "TargetConflict",
    "open_store",
]

# scheme -> (module, class, driver module, pip requirement)
_ENGINES = {
    "sqlite": ("orchestrator.store.sqlite", "SqliteStore", "sqlite3", "python built with sqlite3"),
    "postgresql": ("orchestrator.store.postgres", "PostgresStore", "asyncpg", "asyncpg"),
    "postgres": ("orchestrator.store.postgres", "PostgresStore", "asyncpg", "asyncpg"),
}
_TUNING = {
    "sqlite": frozenset({"busy_timeout_s", "max_batch"}),
    "postgresql": frozenset(
        {"min_size", "max_size", "command_timeout_s", "connect_timeout_s", "schema"}
    ),
}


def _sqlite_path(url: str) -> str:
    """``sqlite:///var/x.db`` -> ``var/x.db``; ``sqlite:////srv/x.db`` -> ``/srv/x.db``."""
    rest = url[len("sqlite://") :]
    if not rest.startswith("/") or len(rest) < 2:
        raise ConfigError(
            f"bad SQLite URL {url!r}: use sqlite:///relative/path.db or sqlite:////abs/path.db"
        )
    path = unquote(rest[1:].split("?", 1)[0])
    if path in ("", ":memory:"):
        raise ConfigError(f"bad SQLite URL {url!r}: the store needs a file path")
    return path


def open_store(url: str, **tuning: Any) -> Store:
    """The store for ``url`` (not opened yet). Unknown scheme or tuning key: ``ConfigError``.

    Tuning keys — SQLite: ``busy_timeout_s``, ``max_batch``; PostgreSQL: ``min_size``,
    ``max_size``, ``command_timeout_s``, ``connect_timeout_s``, ``schema``.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _ENGINES:
        raise ConfigError(
            f"unknown store URL scheme {scheme!r} in {url!r}: "
            "use sqlite:///path, postgresql://… or postgres://…"
        )
    module_name, class_name, driver, requirement = _ENGINES[scheme]
    engine = "sqlite" if scheme == "sqlite" else "postgresql"
    unknown = set(tuning) - _TUNING[engine]
    if unknown:
        raise ConfigError(f"unknown {engine} store option(s): {', '.join(sorted(unknown))}")
    try:
        importlib.import_module(driver)
    except ImportError as exc:
        raise ConfigError(
            f"the {engine} store needs the {driver!r} module: install {requirement!r}"
        ) from exc
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        if engine == "sqlite":
            return cls(_sqlite_path(url), **tuning)  # type: ignore[no-any-return]
        return cls(url, **tuning)  # type: ignore[no-any-return]
    except ValueError as exc:
        raise ConfigError(f"bad store configuration: {exc}") from exc

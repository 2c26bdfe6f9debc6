"""The SQLite engine: the embedded default store (one file, zero set-up).

How it is built, and why:

* **One writer connection, owned by one thread, with group commit.** SQLite serializes
  writers anyway, and with ``synchronous=FULL`` every commit costs an fsync (≈0.6 ms
  here). Writes are therefore queued as plain functions and run in batches: one
  ``BEGIN IMMEDIATE`` … ``COMMIT`` per batch, one ``SAVEPOINT`` per operation so that one
  operation's refusal (``LeaseLost``, ``InvalidTransition``) rolls back only its own
  changes. A caller's future resolves only after the batch's ``COMMIT`` returned, so
  "returned" still means "on disk". A batch runs in a single thread hop, which is why the
  engine drives ``sqlite3`` in its own thread instead of hopping per statement.
* **A second connection for reads** (WAL lets it read while the writer writes).
* **Across processes** the same file may be opened by several processes: every write
  transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock before reading, so a
  claim cannot act on a stale read) and waits up to ``busy_timeout_s`` for the lock.
  The partial unique indexes are the last line of defence either way.
* **Time** is the process clock (``time.time``), stored as integer microseconds.
* **Errors**: any ``sqlite3`` failure of a batch (disk full, I/O error, lock timeout)
  rolls the whole batch back and raises ``StoreUnavailable`` to each of its callers; the
  next batch starts from a clean connection state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Self, TypeVar, cast

from orchestrator.errors import (
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    RollbackError,
    SchemaError,
    StoreError,
    StoreUnavailable,
)
from orchestrator.jobs import (
    WORKER_TARGETS,
    Attempt,
    AttemptIn,
    AttemptOutcome,
    AuditEvent,
    AuditKind,
    Claimed,
    EnqueueResult,
    Job,
    JobStatus,
    NewJob,
    Page,
    QueueStats,
    new_job_id,
    sources_for,
)
from orchestrator.store import sqlite_queries as q
from orchestrator.store.base import (
    MAX_CLAIM_LIMIT,
    MAX_PAGE_LIMIT,
    AppBusy,
    DuplicateTarget,
    Store,
    audit_json,
    budget_wait_s,
    check_budget_args,
    check_limit,
    check_positive,
    check_schema_version,
    decode_cursor,
    encode_cursor,
    load_migrations,
)

T = TypeVar("T")
Row = tuple[Any, ...]

ENGINE: Final = "sqlite"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


def _now_us() -> int:
    return time.time_ns() // 1000


def _to_dt(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _to_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("datetimes given to the store must be timezone-aware")
    return (moment - _EPOCH) // _US


def _job(row: Row, attempts: tuple[Attempt, ...] = ()) -> Job:
    """A ``jobs`` row in ``q.JOB_COLUMNS`` order (``seq`` first) as a ``Job``."""
    return Job(
        id=row[1],
        change_order_id=row[2],
        app_id=row[3],
        region=row[4],
        status=JobStatus(row[5]),
        source=row[6],
        reason=row[7],
        requested_by=row[8],
        dry_run=bool(row[9]),
        created_at=_dt(row[10]),
        updated_at=_dt(row[11]),
        finished_at=_to_dt(row[12]),
        next_attempt_at=_to_dt(row[13]),
        error_code=row[14],
        error_message=row[15],
        attempt_count=row[16],
        call_count=row[17],
        needs_reconcile=bool(row[18]),
        lease_owner=row[19],
        lease_token=row[20],
        lease_expires_at=_to_dt(row[21]),
        interrupted_count=row[22],
        first_attempt_at=_to_dt(row[23]),
        attempts=attempts,
    )


def _attempt(row: Row) -> Attempt:
    """An ``attempts`` row in ``q.ATTEMPT_COLUMNS`` order (``job_id`` first)."""
    return Attempt(
        number=row[1],
        run=row[2],
        action=row[3],
        started_at=_dt(row[4]),
        duration_ms=row[5],
        http_status=row[6],
        code=row[7],
        message=row[8],
        request_id=row[9],
        trace_id=row[10],
        outcome=AttemptOutcome(row[11]),
    )


def _audit_event(row: Row) -> AuditEvent:
    return AuditEvent(row[0], row[1], _dt(row[2]), AuditKind(row[3]), row[4], json.loads(row[5]))


def _audit(
    conn: sqlite3.Connection,
    job_id: str | None,
    event: AuditKind,
    actor: str | None,
    detail: Mapping[str, Any],
    at: int,
) -> None:
    conn.execute(
        q.INSERT_AUDIT,
        {
            "job_id": job_id,
            "at": at,
            "event": str(event),
            "actor": actor,
            "detail": audit_json(detail),
        },
    )


def _fence_error(conn: sqlite3.Connection, job_id: str) -> StoreError:
    """Why a fenced write matched no row: the job is gone, or the token is not current."""
    row = conn.execute(q.LEASE_STATE, {"id": job_id}).fetchone()
    if row is None:
        return JobNotFound(f"no job {job_id}")
    return LeaseLost(f"job {job_id} is {row[0]} and no longer leased with this token")


def _split_statements(script: str) -> Iterator[str]:
    """The statements of a migration file (``sqlite3.complete_statement`` knows triggers)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    leftover = "".join(
        ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")
    )
    if leftover:
        raise SchemaError(f"incomplete SQL statement at the end of a migration: {leftover!r}")


def _translate(exc: sqlite3.Error) -> StoreError:
    """A ``sqlite3`` error as the store error callers act on (cause attached)."""
    message = str(exc)
    err: StoreError
    if "no such table" in message:
        err = SchemaError(f"the store schema is missing ({message}): run `sae-rollback migrate`")
    elif isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError):
        err = StoreError(f"SQLite error: {message}")  # a bug here, not a passing condition
    elif isinstance(exc, sqlite3.DatabaseError):
        # disk full, I/O error, lock timeout, read-only file: the commit did not happen
        err = StoreUnavailable(f"SQLite cannot commit: {message}")
    else:
        err = StoreError(f"SQLite error: {message}")
    err.__cause__ = exc
    return err


class _ConnectionThread:
    """One ``sqlite3`` connection confined to one thread; callers hand it whole functions."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None

    async def start(self, connect: Callable[[], sqlite3.Connection]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError("the SQLite store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        # The executor thread is idle now; wait=True joins it so nothing outlives close().
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)


@dataclass(slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    wakes: bool


@dataclass(slots=True)
class _BatchFailed:
    error: sqlite3.Error


def _run_batch(
    fns: Sequence[Callable[[sqlite3.Connection], Any]], conn: sqlite3.Connection
) -> list[tuple[bool, Any]] | _BatchFailed:
    """Run write operations in one transaction (in the writer thread).

    Each operation gets a savepoint: an exception that is not a ``sqlite3`` error (the
    operation refused: lease lost, invalid transition) undoes that operation only. A
    ``sqlite3`` error means the transaction itself is in doubt (SQLite may already have
    rolled it back on SQLITE_FULL), so the whole batch is rolled back and fails.
    """
    results: list[tuple[bool, Any]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for fn in fns:
            conn.execute("SAVEPOINT op")
            try:
                value = fn(conn)
            except sqlite3.Error:
                raise
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((False, exc))
            else:
                conn.execute("RELEASE op")
                results.append((True, value))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return _BatchFailed(exc)
    return results


class SqliteStore:
    """The ``Store`` on one SQLite file (see the module docstring)."""

    engine: str = ENGINE

    def __init__(self, path: str, *, busy_timeout_s: float = 5.0, max_batch: int = 256) -> None:
        if not path or path == ":memory:":
            raise ValueError("the SQLite store needs a file path (':memory:' is not shared)")
        check_positive(busy_timeout_s, "busy_timeout_s")
        check_limit(max_batch, 10_000, "max_batch")
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._max_batch = max_batch
        self._writer: _ConnectionThread | None = None
        self._reader: _ConnectionThread | None = None
        self._pending: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None
        self._work = asyncio.Event()
        self._migrations = load_migrations("sqlite")

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # -- lifecycle ------------------------------------------------------------------------------

    def _connect(self, *, create: bool, read_only: bool = False) -> sqlite3.Connection:
        if create:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            target, uri = self.path, False
        else:
            # mode=rw: opening must not create an empty file that then "has no schema"
            target, uri = Path(self.path).resolve().as_uri() + "?mode=rw", True
        conn = sqlite3.connect(
            target,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,
            uri=uri,
        )
        try:
            for pragma in q.PRAGMAS:
                conn.execute(pragma)
            if read_only:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self, *, migrate: bool = False) -> None:
        """Open the writer and reader connections and check the schema version."""
        if self._writer is not None:
            return
        if migrate:
            await self.migrate()
        if not await asyncio.to_thread(Path(self.path).exists):
            raise SchemaError(f"no store at {self.path}: run `sae-rollback migrate`")
        writer, reader = _ConnectionThread("sqlite-writer"), _ConnectionThread("sqlite-reader")
        try:
            await writer.start(lambda: self._connect(create=False))
            await reader.start(lambda: self._connect(create=False, read_only=True))
            version = await reader.call(_schema_version)
            check_schema_version(version, len(self._migrations))
        except BaseException as exc:
            await writer.stop()
            await reader.stop()
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc) from exc
            raise
        self._writer, self._reader = writer, reader

    async def close(self) -> None:
        """Finish queued writes, then close both connections and their threads."""
        writer, reader = self._writer, self._reader
        if writer is None or reader is None:
            return
        # Let the queued writes commit (their callers are waiting for them) before stopping.
        while self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)
        self._writer = self._reader = None
        await writer.stop()
        await reader.stop()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def migrate(self, target: int | None = None) -> list[str]:
        """Apply the missing migrations in one transaction; return their names."""
        try:
            return await asyncio.to_thread(self._migrate_sync, target)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        except OSError as exc:  # the directory cannot be created (read-only, not a dir...)
            raise StoreUnavailable(f"cannot create the SQLite file {self.path}: {exc}") from exc

    def _migrate_sync(self, target: int | None) -> list[str]:
        latest = len(self._migrations)
        conn = self._connect(create=True)
        try:
            conn.execute("BEGIN IMMEDIATE")  # two migrating processes run one after the other
            try:
                conn.execute(q.CREATE_MIGRATIONS_TABLE)
                applied = {row[0] for row in conn.execute(q.APPLIED_VERSIONS)}
                if applied and max(applied) > latest:
                    check_schema_version(max(applied), latest)
                names: list[str] = []
                for migration in self._migrations:
                    if migration.version in applied:
                        continue
                    if target is not None and migration.version > target:
                        break
                    for statement in _split_statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(
                        q.INSERT_MIGRATION,
                        {"version": migration.version, "name": migration.name, "now": _now_us()},
                    )
                    names.append(migration.name)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return names
        finally:
            conn.close()

    async def schema_version(self) -> int:
        """The highest applied migration (0 when the file or the table does not exist)."""
        if self._reader is not None:
            return await self._read(_schema_version)
        if not await asyncio.to_thread(Path(self.path).exists):
            return 0

        def standalone() -> int:
            conn = self._connect(create=False, read_only=True)
            try:
                return _schema_version(conn)
            finally:
                conn.close()

        try:
            return await asyncio.to_thread(standalone)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def ping(self) -> None:
        """Readiness: the file answers a query."""
        await self._read(lambda conn: conn.execute(q.PING).fetchone())

    # -- plumbing -------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        reader = self._reader
        if reader is None:
            raise StoreError("the SQLite store is not open: call open() first")
        try:
            return await reader.call(fn)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, wakes: bool = False) -> T:
        """Queue ``fn`` for the next group commit; return its result once committed."""
        if self._writer is None:
            raise StoreError("the SQLite store is not open: call open() first")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Write(fn, future, wakes))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        # Once queued, the write commits even if this caller is cancelled: shield keeps a
        # cancelled caller from cancelling the shared future (a lost outcome is worse).
        return cast(T, await asyncio.shield(future))

    async def _flush(self) -> None:
        while self._pending and self._writer is not None:
            batch = self._pending[: self._max_batch]
            del self._pending[: len(batch)]
            writer = self._writer
            fns = [w.fn for w in batch]
            try:
                outcome = await writer.call(functools.partial(_run_batch, fns))
            except BaseException as exc:
                # The thread is gone (or we are being cancelled at loop shutdown): nobody
                # will commit these writes, so their callers must hear it.
                for w in batch + self._pending:
                    if not w.future.done():
                        w.future.set_exception(StoreUnavailable(f"SQLite writer failed: {exc!r}"))
                self._pending.clear()
                if isinstance(exc, Exception):
                    return
                raise
            if isinstance(outcome, _BatchFailed):
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(_translate(outcome.error))
                continue
            wake = False
            for w, (ok, value) in zip(batch, outcome, strict=True):
                if w.future.done():
                    continue
                if ok:
                    w.future.set_result(value)
                    wake = wake or w.wakes
                else:
                    w.future.set_exception(value)
            if wake:
                self._work.set()
        for w in self._pending:  # closed meanwhile
            if not w.future.done():
                w.future.set_exception(StoreError("the SQLite store was closed"))
        self._pending.clear()

    # -- intake ---------------------------------------------------------------------------------

    async def enqueue(self, new: NewJob) -> EnqueueResult:
        """Insert the job, or map the request to the live/keyed job it duplicates."""

        def op(conn: sqlite3.Connection) -> EnqueueResult:
            now = _now_us()
            key = {"source": new.source, "key": new.idempotency_key}
            if new.idempotency_key is not None:
                row = conn.execute(q.JOB_BY_KEY, key).fetchone()
                if row is not None:
                    _audit_dedupe(conn, new, row[1], now)
                    return EnqueueResult(_job(row), deduplicated=True)
            rows = conn.execute(
                q.INSERT_JOB,
                {
                    "id": new_job_id(),
                    "change_order_id": new.change_order_id,
                    "app_id": new.app_id,
                    "region": new.region,
                    "source": new.source,
                    "reason": new.reason,
                    "requested_by": new.requested_by,
                    "dry_run": int(new.dry_run),
                    "now": now,
                },
            ).fetchall()
            deduplicated = not rows
            if deduplicated:
                # The write lock is held, so the live job that conflicted is still there.
                if new.change_order_id is not None:
                    rows = conn.execute(
                        q.LIVE_JOB_BY_CHANGE_ORDER, {"change_order_id": new.change_order_id}
                    ).fetchall()
                else:
                    rows = conn.execute(q.LIVE_APP_ONLY_JOB, {"app_id": new.app_id}).fetchall()
                if not rows:
                    raise StoreError("insert conflicted but no live job matches")
            job = _job(rows[0])
            if new.idempotency_key is not None:
                conn.execute(q.INSERT_KEY, {**key, "job_id": job.id, "now": now})
            if deduplicated:
                _audit_dedupe(conn, new, job.id, now)
            else:
                _audit(conn, job.id, AuditKind.ACCEPTED, new.source, _accepted_detail(new), now)
            return EnqueueResult(job, deduplicated)

        return await self._write(op, wakes=True)

    async def record_rejection(self, source: str, reason: str, detail: Mapping[str, Any]) -> None:
        """Audit a refused request (no job)."""

        def op(conn: sqlite3.Connection) -> None:
            _audit(conn, None, AuditKind.REJECTED, source, {**detail, "reason": reason}, _now_us())

        await self._write(op)

    async def cancel(self, job_id: str, reason: str, by: str) -> Job:
        """Cancel a queued/waiting job."""
        return await self._write(lambda conn: _cancel(conn, job_id, reason, by))

    async def cancel_by_idempotency_key(
        self, source: str, key: str, reason: str, by: str
    ) -> Job | None:
        """Cancel the job ``key`` maps to (``None`` if the key is unknown)."""

        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(q.JOB_ID_BY_KEY, {"source": source, "key": key}).fetchone()
            return None if row is None else _cancel(conn, row[0], reason, by)

        return await self._write(op)

    # -- worker ---------------------------------------------------------------------------------

    async def claim(self, owner: str, lease_s: float, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due jobs, oldest due first, one per app."""
        check_positive(lease_s, "lease_s")
        check_limit(limit, MAX_CLAIM_LIMIT, "limit")

        def op(conn: sqlite3.Connection) -> list[Claimed]:
            now = _now_us()
            expires = now + int(lease_s * 1_000_000)
            candidates = conn.execute(
                q.CLAIM_CANDIDATES, {"now": now, "scan": min(limit * 4 + 16, 4 * MAX_CLAIM_LIMIT)}
            ).fetchall()
            apps: set[str] = set()
            claimed: list[Claimed] = []
            for seq, app_id in candidates:
                if len(claimed) == limit:
                    break
                if app_id is not None:
                    if app_id in apps:
                        continue  # one job per app per batch, too
                    apps.add(app_id)
                rows = conn.execute(
                    q.CLAIM_ONE,
                    {
                        "seq": seq,
                        "owner": owner,
                        "token": secrets.token_hex(16),
                        "expires": expires,
                        "now": now,
                    },
                ).fetchall()
                job = _job(rows[0])
                detail = {"attempt": job.attempt_count, "lease_expires_at": job.lease_expires_at}
                _audit(conn, job.id, AuditKind.CLAIMED, owner, detail, now)
                claimed.append(Claimed(job, cast(str, job.lease_token), _dt(expires)))
            return claimed

        return await self._write(op)

    async def heartbeat(self, job_id: str, token: str, lease_s: float) -> datetime:
        """Extend the lease to now + ``lease_s``."""
        check_positive(lease_s, "lease_s")

        def op(conn: sqlite3.Connection) -> datetime:
            expires = _now_us() + int(lease_s * 1_000_000)
            rows = conn.execute(
                q.HEARTBEAT, {"id": job_id, "token": token, "expires": expires}
            ).fetchall()
            if not rows:
                raise _fence_error(conn, job_id)
            return _dt(rows[0][0])

        return await self._write(op)

    async def record_attempt(self, job_id: str, token: str, attempt: AttemptIn) -> int:
        """Store one SAE call under the caller's lease; return its number."""

        started_us = _to_us(attempt.started_at)
        return await self._write(
            lambda conn: _record_attempt(conn, job_id, token, attempt, started_us)
        )

    async def set_target(
        self,
        job_id: str,
        token: str,
        *,
        change_order_id: str | None = None,
        app_id: str | None = None,
    ) -> Job:
        """Fill in the resolved change order / app, respecting the uniqueness rules."""
        if change_order_id is None and app_id is None:
            raise ValueError("set_target needs a change_order_id or an app_id")

        def op(conn: sqlite3.Connection) -> Job:
            params = {"id": job_id, "token": token}
            current = conn.execute(q.FENCED_JOB, params).fetchone()
            if current is None:
                raise _fence_error(conn, job_id)
            job = _job(current)
            _check_fill_only(job, change_order_id, app_id)
            # Explicit checks (the write lock is held, so they cannot race) give the worker
            # the conflicting job's id; the unique indexes would refuse the update anyway.
            if change_order_id is not None and job.change_order_id is None:
                other = conn.execute(
                    q.OTHER_LIVE_JOB_WITH_CHANGE_ORDER,
                    {"change_order_id": change_order_id, "id": job_id},
                ).fetchone()
                if other is not None:
                    raise DuplicateTarget(
                        f"change order {change_order_id} already has live job {other[0]}",
                        other[0],
                    )
            if app_id is not None and job.app_id is None:
                other = conn.execute(
                    q.OTHER_ACTIVE_JOB_OF_APP, {"app_id": app_id, "id": job_id}
                ).fetchone()
                if other is not None:
                    raise AppBusy(f"app {app_id} already has active job {other[0]}", other[0])
            now = _now_us()
            rows = conn.execute(
                q.SET_TARGET,
                {**params, "change_order_id": change_order_id, "app_id": app_id, "now": now},
            ).fetchall()
            updated = _job(rows[0])
            detail = {"change_order_id": updated.change_order_id, "app_id": updated.app_id}
            _audit(conn, job_id, AuditKind.TARGET_SET, updated.lease_owner, detail, now)
            return updated

        return await self._write(op)

    async def transition(
        self,
        job_id: str,
        token: str,
        to_status: JobStatus,
        error_code: str | None = None,
        error_message: str | None = None,
        *,
        attempt: AttemptIn | None = None,
    ) -> Job:
        """Move a leased job to verifying/succeeded/failed/skipped (with its last attempt)."""
        to_status = JobStatus(to_status)
        if to_status not in WORKER_TARGETS:
            raise InvalidTransition(f"a worker cannot move a job to {to_status}")
        s1, s2 = _two(sources_for(to_status))
        started_us = None if attempt is None else _to_us(attempt.started_at)

        def op(conn: sqlite3.Connection) -> Job:
            if attempt is not None:
                # same savepoint: a refused transition takes the attempt row back with it
                _record_attempt(conn, job_id, token, attempt, cast(int, started_us))
            now = _now_us()
            rows = conn.execute(
                q.TRANSITION,
                {
                    "id": job_id,
                    "token": token,
                    "status": str(to_status),
                    "error_code": error_code,
                    "error_message": error_message,
                    "terminal": to_status.is_terminal,
                    "now": now,
                    "s1": s1,
                    "s2": s2,
                },
            ).fetchall()
            if not rows:
                state = conn.execute(q.LEASE_STATE, {"id": job_id}).fetchone()
                if state is not None and state[1] == token:
                    raise InvalidTransition(f"job {job_id} is {state[0]}, cannot be {to_status}")
                raise _fence_error(conn, job_id)
            job = _job(rows[0])
            event = AuditKind.FINISHED if to_status.is_terminal else AuditKind(str(to_status))
            # same shape as PostgreSQL's jsonb_strip_nulls(...)
            detail = {"status": str(to_status), "error_code": error_code}
            detail["error_message"] = error_message
            detail = {k: v for k, v in detail.items() if v is not None}
            _audit(conn, job_id, event, job.lease_owner, detail, now)
            return job

        # A finished job frees its app: wake waiters that may hold that app's next job.
        return await self._write(op, wakes=to_status.is_terminal)

    async def schedule_retry(
        self,
        job_id: str,
        token: str,
        *,
        delay_s: float | None = None,
        at: datetime | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        reconcile: bool = False,
        attempt: AttemptIn | None = None,
    ) -> Job:
        """Back to ``waiting`` until the given time (with the failed attempt); the lease ends."""
        if (delay_s is None) == (at is None):
            raise ValueError("give exactly one of delay_s and at")
        if delay_s is not None and delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        at_us = None if at is None else _to_us(at)
        started_us = None if attempt is None else _to_us(attempt.started_at)

        def op(conn: sqlite3.Connection) -> Job:
            if attempt is not None:
                _record_attempt(conn, job_id, token, attempt, cast(int, started_us))
            now = _now_us()
            due = at_us if at_us is not None else now + int(cast(float, delay_s) * 1_000_000)
            rows = conn.execute(
                q.SCHEDULE_RETRY,
                {
                    "id": job_id,
                    "token": token,
                    "due": due,
                    "error_code": error_code,
                    "error_message": error_message,
                    "reconcile": int(reconcile),
                    "now": now,
                },
            ).fetchall()
            if not rows:
                raise _fence_error(conn, job_id)
            job = _job(rows[0])
            detail = {
                "next_attempt_at": job.next_attempt_at,
                "error_code": error_code,
                "error_message": error_message,
                "reconcile": reconcile,
            }
            _audit(conn, job_id, AuditKind.RETRIED, job.lease_owner, detail, now)
            return job

        return await self._write(op, wakes=True)

    async def release(self, job_id: str, token: str, *, reconcile: bool = False) -> Job:
        """Give a leased job back, due now."""

        def op(conn: sqlite3.Connection) -> Job:
            now = _now_us()
            rows = conn.execute(
                q.RELEASE, {"id": job_id, "token": token, "reconcile": int(reconcile), "now": now}
            ).fetchall()
            if not rows:
                raise _fence_error(conn, job_id)
            job = _job(rows[0])
            detail = {"status": str(job.status), "reconcile": job.needs_reconcile}
            _audit(conn, job_id, AuditKind.RELEASED, job.lease_owner, detail, now)
            return job

        return await self._write(op, wakes=True)

    async def rescue_expired(self, max_interrupts: int) -> int:
        """Requeue jobs whose lease expired; fail those interrupted ``max_interrupts`` times."""
        check_limit(max_interrupts, 1_000_000, "max_interrupts")

        def op(conn: sqlite3.Connection) -> int:
            now = _now_us()
            expired = conn.execute(q.EXPIRED_LEASES, {"now": now}).fetchall()
            for job_id, status, owner in expired:
                row = conn.execute(
                    q.RESCUE_ONE, {"id": job_id, "now": now, "max_interrupts": max_interrupts}
                ).fetchone()
                # same keys as PostgreSQL's RESCUE_EXPIRED audit detail
                detail = {
                    "from": status,
                    "status": row[1],
                    "interrupted_count": row[2],
                    "error_code": row[3],
                    "error_message": row[4],
                    "attempt_count": row[5],
                    "owner": owner,
                }
                _audit(conn, job_id, AuditKind.RESCUED, owner, detail, now)
            return len(expired)

        return await self._write(op, wakes=True)

    async def take_call_tokens(
        self, bucket: str, rate_per_minute: float, burst: float, n: float = 1.0
    ) -> float:
        """Token bucket in the database file, shared by every process that opens it."""
        check_budget_args(rate_per_minute, burst, n)

        def op(conn: sqlite3.Connection) -> float:
            now = _now_us()
            row = conn.execute(q.BUDGET_GET, {"bucket": bucket}).fetchone()
            if row is None:
                tokens, stamp = burst, now
            else:
                elapsed_s = max(0, now - row[1]) / 1_000_000
                tokens = min(burst, row[0] + elapsed_s * rate_per_minute / 60.0)
                stamp = max(now, row[1])
            granted = tokens >= n
            if granted:
                tokens -= n
            conn.execute(q.BUDGET_PUT, {"bucket": bucket, "tokens": tokens, "now": stamp})
            return budget_wait_s(tokens, granted, rate_per_minute, n)

        return await self._write(op)

    async def wait_for_work(self, timeout_s: float) -> bool:
        """Wait for an in-process wake-up or the next scheduled due time (polling otherwise)."""
        # Clear before looking, so a wake-up that lands between the query and the wait
        # is not lost.
        self._work.clear()
        row = await self._read(lambda conn: conn.execute(q.NEXT_DUE).fetchone())
        due = None if row is None else row[0]
        wait_s = timeout_s
        if due is not None:
            until_due = (due - _now_us()) / 1_000_000
            if until_due <= 0:
                return True
            wait_s = min(timeout_s, until_due)
        try:
            await asyncio.wait_for(self._work.wait(), wait_s)
        except TimeoutError:
            return wait_s < timeout_s  # shortened because a retry comes due: work
        return True

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        """The job with its attempts."""

        def fn(conn: sqlite3.Connection) -> Job:
            with _snapshot(conn):
                row = conn.execute(q.JOB_BY_ID, {"id": job_id}).fetchone()
                if row is None:
                    raise JobNotFound(f"no job {job_id}")
                attempts = conn.execute(q.ATTEMPTS_OF_JOB, {"id": job_id}).fetchall()
            return _job(row, tuple(_attempt(a) for a in attempts))

        return await self._read(fn)

    async def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        app_id: str | None = None,
        source: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Newest first; the cursor is the last seen insertion sequence, opaque."""
        check_limit(limit, MAX_PAGE_LIMIT, "limit")
        before = None if cursor is None else decode_cursor(cursor)
        params = {
            "status": None if status is None else str(JobStatus(status)),
            "app_id": app_id,
            "source": source,
            "before": before,
            "limit": limit + 1,
        }

        def fn(conn: sqlite3.Connection) -> Page:
            with _snapshot(conn):
                rows = conn.execute(q.LIST_JOBS, params).fetchall()[: limit + 1]
                more = len(rows) > limit
                rows = rows[:limit]
                ids = json.dumps([r[1] for r in rows])
                attempt_rows = conn.execute(q.ATTEMPTS_OF_JOBS, {"ids": ids}).fetchall()
            by_job: dict[str, list[Attempt]] = {}
            for a in attempt_rows:
                by_job.setdefault(a[0], []).append(_attempt(a))
            items = tuple(_job(r, tuple(by_job.get(r[1], ()))) for r in rows)
            return Page(items, encode_cursor(rows[-1][0]) if more else None)

        return await self._read(fn)

    async def audit(self, job_id: str) -> list[AuditEvent]:
        """The job's audit trail, oldest first."""

        def fn(conn: sqlite3.Connection) -> list[AuditEvent]:
            with _snapshot(conn):
                if conn.execute(q.LEASE_STATE, {"id": job_id}).fetchone() is None:
                    raise JobNotFound(f"no job {job_id}")
                rows = conn.execute(q.AUDIT_OF_JOB, {"id": job_id}).fetchall()
            return [_audit_event(r) for r in rows]

        return await self._read(fn)

    async def rejections(self, limit: int = 100) -> list[AuditEvent]:
        """Job-less audit rows (refused requests), newest first."""
        check_limit(limit, MAX_PAGE_LIMIT, "limit")

        def fn(conn: sqlite3.Connection) -> list[AuditEvent]:
            rows = conn.execute(q.JOBLESS_AUDIT, {"limit": limit}).fetchall()
            return [_audit_event(r) for r in rows]

        return await self._read(fn)

    async def stats(self) -> QueueStats:
        """Counts per status and the age of the oldest due job."""

        def fn(conn: sqlite3.Connection) -> QueueStats:
            now = _now_us()
            with _snapshot(conn):
                counts = dict.fromkeys(JobStatus, 0)
                for status, count in conn.execute(q.COUNT_BY_STATUS):
                    counts[JobStatus(status)] = count
                oldest = conn.execute(q.OLDEST_DUE, {"now": now}).fetchone()
            age = 0.0 if oldest is None else max(0.0, (now - oldest[0]) / 1_000_000)
            return QueueStats(counts, age)

        return await self._read(fn)

    async def maintain(self) -> bool:
        """``PRAGMA optimize``: SQLite's own cheap check for statistics worth refreshing."""

        def op(conn: sqlite3.Connection) -> bool:
            conn.execute("PRAGMA optimize")
            return True

        return await self._write(op)

    async def prune(self, finished_before: datetime) -> int:
        """Delete terminal jobs finished before the cutoff, and old job-less audit rows."""
        cutoff = _to_us(finished_before)

        def op(conn: sqlite3.Connection) -> int:
            deleted = conn.execute(q.PRUNE_JOBS, {"cutoff": cutoff}).rowcount
            conn.execute(q.PRUNE_JOBLESS_AUDIT, {"cutoff": cutoff})
            return deleted

        return await self._write(op)


# -- operation helpers (run in the writer thread) ----------------------------------------------


def _schema_version(conn: sqlite3.Connection) -> int:
    if conn.execute(q.MIGRATIONS_TABLE_EXISTS).fetchone()[0] == 0:
        return 0
    return cast(int, conn.execute(q.SCHEMA_VERSION).fetchone()[0])


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction, so multi-statement reads see one consistent state."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _accepted_detail(new: NewJob) -> dict[str, Any]:
    return {
        "change_order_id": new.change_order_id,
        "app_id": new.app_id,
        "requested_by": new.requested_by,
        "dry_run": new.dry_run,
        "idempotency_key": new.idempotency_key,
    }


def _audit_dedupe(conn: sqlite3.Connection, new: NewJob, job_id: str, now: int) -> None:
    _audit(conn, job_id, AuditKind.DEDUPLICATED, new.source, _accepted_detail(new), now)


def _record_attempt(
    conn: sqlite3.Connection, job_id: str, token: str, attempt: AttemptIn, started_us: int
) -> int:
    rows = conn.execute(
        q.COUNT_CALL, {"id": job_id, "token": token, "now": _now_us(), "started_at": started_us}
    ).fetchall()
    if not rows:
        raise _fence_error(conn, job_id)
    number, run = rows[0]
    conn.execute(
        q.INSERT_ATTEMPT,
        {
            "job_id": job_id,
            "number": number,
            "run": run,
            "action": attempt.action,
            "started_at": started_us,
            "duration_ms": attempt.duration_ms,
            "http_status": attempt.http_status,
            "code": attempt.code,
            "message": attempt.message,
            "request_id": attempt.request_id,
            "trace_id": attempt.trace_id,
            "outcome": str(attempt.outcome),
        },
    )
    return cast(int, number)


def _cancel(conn: sqlite3.Connection, job_id: str, reason: str, by: str) -> Job:
    now = _now_us()
    rows = conn.execute(q.CANCEL, {"id": job_id, "reason": reason, "now": now}).fetchall()
    if not rows:
        state = conn.execute(q.LEASE_STATE, {"id": job_id}).fetchone()
        if state is None:
            raise JobNotFound(f"no job {job_id}")
        raise InvalidTransition(f"job {job_id} is {state[0]}: only queued/waiting can be cancelled")
    _audit(conn, job_id, AuditKind.CANCELLED, by, {"reason": reason}, now)
    # The whole job, as GET shows it: a cancelled waiting job keeps the attempts it made.
    attempts = conn.execute(q.ATTEMPTS_OF_JOB, {"id": job_id}).fetchall()
    return _job(rows[0], tuple(_attempt(a) for a in attempts))


def _check_fill_only(job: Job, change_order_id: str | None, app_id: str | None) -> None:
    """``set_target`` fills unknown fields; changing a known one is a caller bug."""
    for name, known, given in (
        ("change_order_id", job.change_order_id, change_order_id),
        ("app_id", job.app_id, app_id),
    ):
        if given is not None and known is not None and known != given:
            raise InvalidTransition(f"job {job.id} already has {name}={known}, not {given}")


def _two(statuses: frozenset[JobStatus]) -> tuple[str, str]:
    """The (one or two) source statuses of a worker transition, padded to two values."""
    ordered = sorted(str(s) for s in statuses)
    if not 1 <= len(ordered) <= 2:
        raise RollbackError(f"unexpected transition sources {ordered}")
    return ordered[0], ordered[-1]


_: type[Store] = SqliteStore

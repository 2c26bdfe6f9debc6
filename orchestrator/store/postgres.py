"""The PostgreSQL engine: the store when several worker/api processes share the work.

How it is built, and why:

* **An asyncpg pool**, with ``command_timeout`` always set. After a server restart the
  pool drops the broken connections and opens new ones on demand: a call that was in
  flight during the restart raises ``StoreUnavailable``, the following calls work.
* **One statement per worker write.** The fencing check, the update, its audit row and
  the wake-up notification are data-modifying CTEs of one statement
  (``postgres_queries``), so each write is atomic and costs one round trip.
* **Group commit for the per-job writes.** Concurrent ``transition`` and
  ``record_attempt`` calls are merged into one multi-row statement (``_Coalescer``):
  one round trip and one commit for the batch, each caller still answered only after the
  commit that holds its row, with its own outcome. Measured with 50 jobs in flight:
  ≈5× the transitions per second of one statement per call (6,284 vs 1,135 /s).
* **Claims** use ``FOR UPDATE SKIP LOCKED``; the unique partial index
  ``jobs_one_active_per_app`` makes "one running job per app" hold across processes (a
  claim that loses that race is retried), and lease times come from ``now()``.
* **Wake-ups** use ``LISTEN``/``NOTIFY`` on a dedicated connection, opened on the first
  ``wait_for_work`` (api-only processes never open it); polling remains the guarantee.
* **Errors**: connection loss, shutdown, timeouts, resource exhaustion and serialization
  failures raise ``StoreUnavailable``; a missing table raises ``SchemaError``; anything
  else ``StoreError``, always with the asyncpg exception as the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Self

import asyncpg
from asyncpg.pool import PoolConnectionProxy

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
)
from orchestrator.store import postgres_queries as q
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

ENGINE: Final = "postgresql"
_Conn = asyncpg.Connection | PoolConnectionProxy
#: How often a claim or an enqueue is retried after losing a uniqueness race.
_RACE_RETRIES: Final = 5

_UNAVAILABLE: Final = (
    asyncpg.PostgresConnectionError,  # class 08: connection failure / does not exist
    asyncpg.OperatorInterventionError,  # class 57: shutdown, cannot connect now, cancelled
    asyncpg.InsufficientResourcesError,  # class 53: disk full, out of memory, too many conns
    asyncpg.TransactionRollbackError,  # class 40: serialization failure, deadlock
    asyncpg.ReadOnlySQLTransactionError,  # connected to a standby after a failover
    asyncpg.InterfaceError,  # "connection is closed" and friends
    OSError,  # refused, reset, unreachable
    TimeoutError,  # command_timeout / connect timeout
)


def _translate(exc: Exception) -> StoreError:
    err: StoreError
    if isinstance(exc, asyncpg.UndefinedTableError):
        err = SchemaError(f"the store schema is missing ({exc}): run `sae-rollback migrate`")
    elif isinstance(exc, _UNAVAILABLE):
        err = StoreUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}")
    else:
        err = StoreError(f"PostgreSQL error: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Translate driver and socket errors at the boundary (our own errors pass through)."""
    try:
        yield
    except RollbackError:
        raise
    except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
        raise _translate(exc) from exc


def _job(row: asyncpg.Record, attempts: tuple[Attempt, ...] = ()) -> Job:
    return Job(
        id=row["id"],
        change_order_id=row["change_order_id"],
        app_id=row["app_id"],
        region=row["region"],
        status=JobStatus(row["status"]),
        source=row["source"],
        reason=row["reason"],
        requested_by=row["requested_by"],
        dry_run=row["dry_run"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        next_attempt_at=row["next_attempt_at"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        attempt_count=row["attempt_count"],
        call_count=row["call_count"],
        needs_reconcile=row["needs_reconcile"],
        lease_owner=row["lease_owner"],
        lease_token=row["lease_token"],
        lease_expires_at=row["lease_expires_at"],
        interrupted_count=row["interrupted_count"],
        first_attempt_at=row["first_attempt_at"],
        attempts=attempts,
    )


def _attempt(row: asyncpg.Record) -> Attempt:
    return Attempt(
        number=row["number"],
        run=row["run"],
        action=row["action"],
        started_at=row["started_at"],
        duration_ms=row["duration_ms"],
        http_status=row["http_status"],
        code=row["code"],
        message=row["message"],
        request_id=row["request_id"],
        trace_id=row["trace_id"],
        outcome=AttemptOutcome(row["outcome"]),
    )


def _audit_event(row: asyncpg.Record) -> AuditEvent:
    return AuditEvent(
        row["id"],
        row["job_id"],
        row["at"],
        AuditKind(row["event"]),
        row["actor"],
        json.loads(row["detail"]),
    )


def _accepted_detail(new: NewJob) -> str:
    return audit_json(
        {
            "change_order_id": new.change_order_id,
            "app_id": new.app_id,
            "requested_by": new.requested_by,
            "dry_run": new.dry_run,
            "idempotency_key": new.idempotency_key,
        }
    )


def _attempt_args(attempt: AttemptIn | None) -> tuple[Any, ...]:
    """(is there one, then the nine AttemptIn fields) as the statements' parameters."""
    if attempt is None:
        return (False, None, None, None, None, None, None, None, None, None)
    return (
        True,
        attempt.action,
        attempt.started_at,
        attempt.duration_ms,
        attempt.http_status,
        attempt.code,
        attempt.message,
        attempt.request_id,
        attempt.trace_id,
        str(attempt.outcome),
    )


class _Retry(Exception):
    """Lost a race inside the enqueue transaction: roll back and start over."""


@dataclass(slots=True)
class _Call:
    job_id: str
    row: tuple[Any, ...]  # this call's element of each array parameter
    future: asyncio.Future[asyncpg.Record | None]


class _Coalescer:
    """Group commit for one hot worker write: concurrent calls become one statement.

    Each call adds its row; one batch is in flight at a time, and the calls that arrive
    meanwhile form the next one. A caller's future resolves once the statement holding
    its row has committed, with the row the statement returned for its job (``None``:
    its fencing condition did not hold, the caller finds out why). Two calls for one
    job never share a statement (an UPDATE … FROM would apply only one of them).
    """

    def __init__(self, store: PostgresStore, statement: str, max_batch: int = 256) -> None:
        self._store = store
        self._statement = statement
        self._max_batch = max_batch
        self._pending: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, job_id: str, row: tuple[Any, ...]) -> asyncpg.Record | None:
        loop = asyncio.get_running_loop()
        call = _Call(job_id, row, loop.create_future())
        self._pending.append(call)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        # The write goes ahead even if this caller is cancelled meanwhile (it is queued);
        # shield keeps a cancelled caller from cancelling the shared batch.
        return await asyncio.shield(call.future)

    async def drain(self) -> None:
        """Wait until every queued call is written (or failed)."""
        while self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        while self._pending:
            batch: list[_Call] = []
            later: list[_Call] = []
            seen: set[str] = set()
            for call in self._pending:
                if call.job_id in seen or len(batch) == self._max_batch:
                    later.append(call)
                else:
                    seen.add(call.job_id)
                    batch.append(call)
            self._pending = later
            columns = [list(values) for values in zip(*(c.row for c in batch), strict=True)]
            try:
                with _errors():
                    rows = await self._store._p().fetch(self._statement, *columns)
            except StoreError as exc:
                for call in batch:
                    _fail(call.future, exc)
                continue
            except BaseException as exc:  # cancelled at loop shutdown: nobody will write these
                for call in batch + self._pending:
                    _fail(call.future, StoreUnavailable(f"write abandoned: {exc!r}"))
                self._pending.clear()
                raise
            by_job = {r["id"]: r for r in rows}
            for call in batch:
                if not call.future.done():
                    call.future.set_result(by_job.get(call.job_id))


def _fail(future: asyncio.Future[Any], exc: StoreError) -> None:
    """Fail one caller with its own exception object (tracebacks must not be shared)."""
    if future.done():
        return
    own = type(exc)(str(exc))
    own.__cause__ = exc.__cause__
    future.set_exception(own)


class PostgresStore:
    """The ``Store`` on PostgreSQL (see the module docstring)."""

    engine: str = ENGINE

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        schema: str | None = None,
    ) -> None:
        check_limit(max_size, 1000, "max_size")
        if not 0 <= min_size <= max_size:
            raise ValueError(f"min_size must be between 0 and max_size, got {min_size}")
        check_positive(command_timeout_s, "command_timeout_s")
        check_positive(connect_timeout_s, "connect_timeout_s")
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        #: ``schema`` puts the tables in that schema (via search_path), e.g. one per test.
        self._server_settings = {"search_path": schema} if schema else None
        self._pool: asyncpg.Pool | None = None
        self._listener: _Conn | None = None
        self._channel: str | None = None
        self._work = asyncio.Event()
        self._migrations = load_migrations("postgres")
        self._transitions = _Coalescer(self, q.TRANSITIONS)
        self._attempts = _Coalescer(self, q.RECORD_ATTEMPTS)

    def __repr__(self) -> str:
        # the DSN may carry a password: show only the engine
        return "PostgresStore(...)"

    # -- lifecycle ------------------------------------------------------------------------------

    async def _connect(self) -> _Conn:
        with _errors():
            return await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings=self._server_settings,
            )

    async def open(self, *, migrate: bool = False) -> None:
        """Create the pool and check the schema version."""
        if self._pool is not None:
            return
        if migrate:
            await self.migrate()
        with _errors():
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout_s,
                timeout=self._connect_timeout_s,
                server_settings=self._server_settings,
                reset=_keep_session,
            )
        try:
            with _errors():
                async with pool.acquire() as conn:
                    version = await _schema_version(conn)
                    check_schema_version(version, len(self._migrations))
                    self._channel = await conn.fetchval(q.CHANNEL)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        """Close the listener connection and the pool (queued writes finish first)."""
        await self._transitions.drain()
        await self._attempts.drain()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.close(timeout=self._connect_timeout_s)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._command_timeout_s)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def migrate(self, target: int | None = None) -> list[str]:
        """Apply missing migrations in one transaction, serialized by an advisory lock."""
        latest = len(self._migrations)
        conn = await self._connect()
        try:
            with _errors():
                async with conn.transaction():
                    await conn.execute(q.MIGRATION_LOCK)
                    await conn.execute(q.CREATE_MIGRATIONS_TABLE)
                    applied = {r[0] for r in await conn.fetch(q.APPLIED_VERSIONS)}
                    if applied and max(applied) > latest:
                        check_schema_version(max(applied), latest)
                    names: list[str] = []
                    for migration in self._migrations:
                        if migration.version in applied:
                            continue
                        if target is not None and migration.version > target:
                            break
                        await conn.execute(migration.sql)
                        await conn.execute(q.INSERT_MIGRATION, migration.version, migration.name)
                        names.append(migration.name)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
        if names and self._pool is not None:
            # cached statement plans may describe the old tables
            await self._pool.expire_connections()
        return names

    async def schema_version(self) -> int:
        """The highest applied migration (0 for an empty schema)."""
        if self._pool is not None:
            with _errors():
                async with self._pool.acquire() as pooled:
                    return await _schema_version(pooled)
        conn = await self._connect()
        try:
            with _errors():
                return await _schema_version(conn)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def ping(self) -> None:
        """Readiness: a pooled connection answers ``SELECT 1``."""
        with _errors():
            await self._p().fetchval(q.PING)

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not open: call open() first")
        return self._pool

    async def _fence_error(self, job_id: str) -> StoreError:
        """Why a fenced write matched no row: the job is gone, or the token is not current."""
        with _errors():
            row = await self._p().fetchrow(q.LEASE_STATE, job_id)
        if row is None:
            return JobNotFound(f"no job {job_id}")
        return LeaseLost(f"job {job_id} is {row['status']} and no longer leased with this token")

    # -- intake ---------------------------------------------------------------------------------

    async def enqueue(self, new: NewJob) -> EnqueueResult:
        """One round trip for a new job; a transaction with fresh snapshots for duplicates."""
        detail = _accepted_detail(new)
        with _errors():
            try:
                row = await self._p().fetchrow(
                    q.ENQUEUE_NEW,
                    new_job_id(),
                    new.change_order_id,
                    new.app_id,
                    new.region,
                    new.source,
                    new.reason,
                    new.requested_by,
                    new.dry_run,
                    new.idempotency_key,
                    detail,
                )
            except asyncpg.UniqueViolationError:
                row = None  # a concurrent request took this idempotency key: slow path
            if row is not None:
                return EnqueueResult(_job(row), deduplicated=False)
            for _ in range(_RACE_RETRIES):
                try:
                    async with self._p().acquire() as conn, conn.transaction():
                        return await self._enqueue_in(conn, new, detail)
                except _Retry:
                    continue
        raise StoreUnavailable("enqueue kept losing races with concurrent requests; retry")

    async def _enqueue_in(self, conn: _Conn, new: NewJob, detail: str) -> EnqueueResult:
        # READ COMMITTED: every statement below sees what committed before it started, so
        # the job that made the insert conflict is visible to the lookup that follows.
        key = new.idempotency_key
        if key is not None:
            row = await conn.fetchrow(q.JOB_BY_KEY, new.source, key)
            if row is not None:
                await conn.execute(q.INSERT_AUDIT, row["id"], "deduplicated", new.source, detail)
                return EnqueueResult(_job(row), deduplicated=True)
        row = await conn.fetchrow(
            q.INSERT_JOB,
            new_job_id(),
            new.change_order_id,
            new.app_id,
            new.region,
            new.source,
            new.reason,
            new.requested_by,
            new.dry_run,
        )
        deduplicated = row is None
        if row is None:
            if new.change_order_id is not None:
                row = await conn.fetchrow(q.LIVE_JOB_BY_CHANGE_ORDER, new.change_order_id)
            else:
                row = await conn.fetchrow(q.LIVE_APP_ONLY_JOB, new.app_id)
            if row is None:
                raise _Retry  # the conflicting job finished in between: insert again
        if (
            key is not None
            and await conn.fetchval(q.INSERT_KEY, new.source, key, row["id"]) is None
        ):
            raise _Retry  # a concurrent request mapped this key first: return its job
        event = "deduplicated" if deduplicated else "accepted"
        await conn.execute(q.INSERT_AUDIT, row["id"], event, new.source, detail)
        if not deduplicated:
            await conn.execute(q.NOTIFY)
        return EnqueueResult(_job(row), deduplicated)

    async def record_rejection(self, source: str, reason: str, detail: Mapping[str, Any]) -> None:
        """Audit a refused request (no job)."""
        with _errors():
            await self._p().execute(
                q.INSERT_AUDIT, None, "rejected", source, audit_json({**detail, "reason": reason})
            )

    async def cancel(self, job_id: str, reason: str, by: str) -> Job:
        """Cancel a queued/waiting job."""
        with _errors():
            async with self._p().acquire() as conn, conn.transaction():
                row = await conn.fetchrow(q.CANCEL, job_id, reason, by)
                if row is not None:
                    # The whole job, as GET shows it: a cancelled waiting job keeps its attempts.
                    attempts = await conn.fetch(q.ATTEMPTS_OF_JOB, job_id)
                    return _job(row, tuple(_attempt(a) for a in attempts))
            state = await self._p().fetchrow(q.LEASE_STATE, job_id)
        if state is None:
            raise JobNotFound(f"no job {job_id}")
        raise InvalidTransition(
            f"job {job_id} is {state['status']}: only queued/waiting can be cancelled"
        )

    async def cancel_by_idempotency_key(
        self, source: str, key: str, reason: str, by: str
    ) -> Job | None:
        """Cancel the job ``key`` maps to (``None`` if the key is unknown)."""
        with _errors():
            job_id = await self._p().fetchval(q.JOB_ID_BY_KEY, source, key)
        return None if job_id is None else await self.cancel(job_id, reason, by)

    # -- worker ---------------------------------------------------------------------------------

    async def claim(self, owner: str, lease_s: float, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due jobs, oldest due first, one per app."""
        check_positive(lease_s, "lease_s")
        check_limit(limit, MAX_CLAIM_LIMIT, "limit")
        with _errors():
            for _ in range(_RACE_RETRIES):
                try:
                    rows = await self._p().fetch(q.claim(limit), owner, float(lease_s))
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name != "jobs_one_active_per_app":
                        raise
                    # Another process claimed a job of the same app after our snapshot
                    # was taken; the index refused the second one. Look again.
                    continue
                return [Claimed(_job(r), r["lease_token"], r["lease_expires_at"]) for r in rows]
        return []

    async def heartbeat(self, job_id: str, token: str, lease_s: float) -> datetime:
        """Extend the lease to database now + ``lease_s``."""
        check_positive(lease_s, "lease_s")
        with _errors():
            expires = await self._p().fetchval(q.HEARTBEAT, job_id, token, float(lease_s))
        if expires is None:
            raise await self._fence_error(job_id)
        return expires  # type: ignore[no-any-return]

    async def record_attempt(self, job_id: str, token: str, attempt: AttemptIn) -> int:
        """Store one SAE call under the caller's lease; return its number."""
        self._p()
        row = await self._attempts.submit(job_id, (job_id, token, *_attempt_args(attempt)[1:]))
        if row is None:
            raise await self._fence_error(job_id)
        return int(row["number"])

    async def set_target(
        self,
        job_id: str,
        token: str,
        *,
        change_order_id: str | None = None,
        app_id: str | None = None,
    ) -> Job:
        """Fill in the resolved change order / app; the unique indexes decide conflicts."""
        if change_order_id is None and app_id is None:
            raise ValueError("set_target needs a change_order_id or an app_id")
        pool = self._p()
        with _errors():
            try:
                row = await pool.fetchrow(q.SET_TARGET, job_id, token, change_order_id, app_id)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "jobs_live_change_order":
                    other = await pool.fetchval(
                        q.OTHER_LIVE_JOB_WITH_CHANGE_ORDER, change_order_id, job_id
                    )
                    raise DuplicateTarget(
                        f"change order {change_order_id} already has live job {other}", other
                    ) from exc
                if exc.constraint_name == "jobs_one_active_per_app":
                    other = await pool.fetchval(q.OTHER_ACTIVE_JOB_OF_APP, app_id, job_id)
                    raise AppBusy(f"app {app_id} already has active job {other}", other) from exc
                raise
            if row is not None:
                return _job(row)
            state = await pool.fetchrow(q.TARGET_STATE, job_id)
        if state is None:
            raise JobNotFound(f"no job {job_id}")
        if state["lease_token"] != token or JobStatus(state["status"]) not in (
            JobStatus.RUNNING,
            JobStatus.VERIFYING,
        ):
            raise LeaseLost(
                f"job {job_id} is {state['status']} and no longer leased with this token"
            )
        raise InvalidTransition(
            f"job {job_id} already targets change order {state['change_order_id']} / "
            f"app {state['app_id']}; set_target only fills unknown fields"
        )

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
        event = AuditKind.FINISHED if to_status.is_terminal else AuditKind(str(to_status))
        self._p()
        row = await self._transitions.submit(
            job_id,
            (
                job_id,
                token,
                str(to_status),
                error_code,
                error_message,
                str(event),
                *_attempt_args(attempt),
            ),
        )
        if row is not None:
            return _job(row)
        with _errors():
            state = await self._p().fetchrow(q.LEASE_STATE, job_id)
        if state is not None and state["lease_token"] == token:
            raise InvalidTransition(f"job {job_id} is {state['status']}, cannot be {to_status}")
        raise await self._fence_error(job_id)

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
        """Back to ``waiting`` until now + ``delay_s`` (database clock) or ``at``."""
        if (delay_s is None) == (at is None):
            raise ValueError("give exactly one of delay_s and at")
        if delay_s is not None and delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        if at is not None and at.tzinfo is None:
            raise ValueError("datetimes given to the store must be timezone-aware")
        with _errors():
            row = await self._p().fetchrow(
                q.SCHEDULE_RETRY,
                job_id,
                token,
                at,
                None if delay_s is None else float(delay_s),
                error_code,
                error_message,
                reconcile,
                *_attempt_args(attempt),
            )
        if row is None:
            raise await self._fence_error(job_id)
        return _job(row)

    async def release(self, job_id: str, token: str, *, reconcile: bool = False) -> Job:
        """Give a leased job back, due now."""
        with _errors():
            row = await self._p().fetchrow(q.RELEASE, job_id, token, reconcile)
        if row is None:
            raise await self._fence_error(job_id)
        return _job(row)

    async def rescue_expired(self, max_interrupts: int) -> int:
        """Requeue jobs whose lease expired; fail those interrupted ``max_interrupts`` times."""
        check_limit(max_interrupts, 1_000_000, "max_interrupts")
        with _errors():
            row = await self._p().fetchrow(q.RESCUE_EXPIRED, max_interrupts)
        return int(row["rescued"]) if row is not None else 0

    async def take_call_tokens(
        self, bucket: str, rate_per_minute: float, burst: float, n: float = 1.0
    ) -> float:
        """Token bucket row updated atomically with the database clock."""
        check_budget_args(rate_per_minute, burst, n)
        with _errors():
            row = await self._p().fetchrow(
                q.TAKE_CALL_TOKENS, bucket, float(rate_per_minute), float(burst), float(n)
            )
        assert row is not None  # an upsert with RETURNING always returns the row
        return budget_wait_s(row["tokens"], row["granted"], rate_per_minute, n)

    async def wait_for_work(self, timeout_s: float) -> bool:
        """Wait for a NOTIFY or the next scheduled due time; plain timeout without LISTEN."""
        # Clear, then LISTEN, then look: a notification after the look is not lost, one
        # before it is covered by the look.
        self._work.clear()
        await self._listen()
        with _errors():
            due_in = await self._p().fetchval(q.NEXT_DUE_IN)
        wait_s = timeout_s
        if due_in is not None:
            if due_in <= 0:
                return True
            wait_s = min(timeout_s, due_in)
        try:
            await asyncio.wait_for(self._work.wait(), wait_s)
        except TimeoutError:
            return wait_s < timeout_s
        return True

    async def _listen(self) -> None:
        """Best effort: (re)open the LISTEN connection; polling covers its absence."""
        if self._listener is not None and not self._listener.is_closed():
            return
        channel = self._channel
        if channel is None:
            raise StoreError("the PostgreSQL store is not open: call open() first")
        try:
            conn = await self._connect()
        except StoreUnavailable:
            return
        try:
            with _errors():
                await conn.add_listener(channel, self._on_notify)
        except StoreUnavailable:
            with contextlib.suppress(Exception):
                await conn.close()
            return
        self._listener = conn

    def _on_notify(self, *_args: object) -> None:
        self._work.set()

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        """The job with its attempts (one snapshot)."""
        with _errors():
            async with (
                self._p().acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                row = await conn.fetchrow(q.JOB_BY_ID, job_id)
                if row is None:
                    raise JobNotFound(f"no job {job_id}")
                attempts = await conn.fetch(q.ATTEMPTS_OF_JOB, job_id)
        return _job(row, tuple(_attempt(a) for a in attempts))

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
        status_text = None if status is None else str(JobStatus(status))
        with _errors():
            async with (
                self._p().acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                rows = await conn.fetch(q.LIST_JOBS, status_text, app_id, source, before, limit + 1)
                more = len(rows) > limit
                rows = rows[:limit]
                attempt_rows = await conn.fetch(q.ATTEMPTS_OF_JOBS, [r["id"] for r in rows])
        by_job: dict[str, list[Attempt]] = {}
        for a in attempt_rows:
            by_job.setdefault(a["job_id"], []).append(_attempt(a))
        items = tuple(_job(r, tuple(by_job.get(r["id"], ()))) for r in rows)
        return Page(items, encode_cursor(rows[-1]["seq"]) if more else None)

    async def audit(self, job_id: str) -> list[AuditEvent]:
        """The job's audit trail, oldest first."""
        with _errors():
            async with (
                self._p().acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                if await conn.fetchrow(q.LEASE_STATE, job_id) is None:
                    raise JobNotFound(f"no job {job_id}")
                rows = await conn.fetch(q.AUDIT_OF_JOB, job_id)
        return [_audit_event(r) for r in rows]

    async def rejections(self, limit: int = 100) -> list[AuditEvent]:
        """Job-less audit rows (refused requests), newest first."""
        check_limit(limit, MAX_PAGE_LIMIT, "limit")
        with _errors():
            rows = await self._p().fetch(q.JOBLESS_AUDIT, limit)
        return [_audit_event(r) for r in rows]

    async def stats(self) -> QueueStats:
        """Counts per status and the age of the oldest due job."""
        with _errors():
            async with self._p().acquire() as conn:
                rows = await conn.fetch(q.COUNT_BY_STATUS)
                age = await conn.fetchval(q.OLDEST_DUE_AGE)
        counts = dict.fromkeys(JobStatus, 0)
        for r in rows:
            counts[JobStatus(r["status"])] = r["count"]
        return QueueStats(counts, max(0.0, float(age)))

    async def maintain(self) -> bool:
        """``ANALYZE jobs`` when it was never analyzed or a tenth of it changed since.

        Autovacuum does this on a default server; with autovacuum off the table never has
        statistics and the claim plan degrades to sorting every due row (measured: 12.8 ms
        per claim at 5,000 queued, 1.5 ms after ANALYZE).
        """
        with _errors():
            async with self._p().acquire() as conn:
                stale = await conn.fetchval(q.JOBS_STATISTICS_STALE)
                if not stale:
                    return False
                await conn.execute("ANALYZE jobs")
        return True

    async def prune(self, finished_before: datetime) -> int:
        """Delete terminal jobs finished before the cutoff, and old job-less audit rows."""
        if finished_before.tzinfo is None:
            raise ValueError("datetimes given to the store must be timezone-aware")
        with _errors():
            async with self._p().acquire() as conn, conn.transaction():
                deleted = await conn.fetchval(q.PRUNE_JOBS, finished_before)
                await conn.execute(q.PRUNE_JOBLESS_AUDIT, finished_before)
        return int(deleted)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool ``reset`` hook: nothing to reset, so skip asyncpg's default reset query.

    asyncpg runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release by default: one extra round trip per store call (measured: as many reset
    queries as store statements). The store never leaves session state behind — no SET,
    no LISTEN on pooled connections (the listener has its own), only transaction-scoped
    advisory locks, no cursors — and asyncpg still rolls back a transaction left open.
    """


async def _schema_version(conn: _Conn) -> int:
    if not await conn.fetchval(q.MIGRATIONS_TABLE_EXISTS):
        return 0
    return int(await conn.fetchval(q.SCHEMA_VERSION))


_: type[Store] = PostgresStore

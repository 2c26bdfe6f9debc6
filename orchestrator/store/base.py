"""The ``Store`` contract every engine implements, and what the engines share.

The store is the queue and the record at once: jobs, their SAE call attempts, and the
append-only audit trail. Engines (``sqlite.py``, ``postgres.py``) are assigned to
:class:`Store` at the bottom of their modules so mypy checks their conformance; one
contract test suite (``tests/contract``) checks their behaviour.

Errors raised by every engine (besides those of ``orchestrator.errors``)::

    StoreError
    ├── TargetConflict           set_target would break a uniqueness rule
    │   ├── DuplicateTarget      another live job already has that change order
    │   └── AppBusy              another job of that app is running/verifying
    └── (StoreUnavailable, SchemaError, JobNotFound, LeaseLost, InvalidTransition)
    InvalidCursor (also a ValueError)   a list cursor that this store never produced

Fencing rule (decided here, implemented by both engines): a worker's write is accepted
iff the job is running/verifying *and* its lease token is the one the worker got from
``claim``. An expired lease alone does not reject a write: until ``rescue_expired``
takes the job back (which clears the token) the original worker is still the only one
that can hold it. Once the job was rescued or re-claimed, the old token matches nothing
and the write raises ``LeaseLost`` having changed nothing (token check and write happen
in one statement/transaction).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Final, Protocol

from orchestrator.errors import RollbackError, SchemaError, StoreError
from orchestrator.jobs import (
    AttemptIn,
    AuditEvent,
    Claimed,
    EnqueueResult,
    Job,
    JobStatus,
    NewJob,
    Page,
    QueueStats,
    rfc3339,
)

#: ``list_jobs`` page size bounds.
MAX_PAGE_LIMIT: Final = 1000
#: Upper bound of jobs one ``claim`` call may take.
MAX_CLAIM_LIMIT: Final = 1000


class TargetConflict(StoreError):
    """``set_target`` would break "one live job per change order" or "one active job per app"."""


class DuplicateTarget(TargetConflict):
    """Another live job already targets this change order: the worker skips as duplicate."""

    def __init__(self, message: str, existing_job_id: str | None) -> None:
        super().__init__(message)
        self.existing_job_id = existing_job_id


class AppBusy(TargetConflict):
    """Another job of this app is running or verifying: retry later."""

    def __init__(self, message: str, running_job_id: str | None) -> None:
        super().__init__(message)
        self.running_job_id = running_job_id


class InvalidCursor(RollbackError, ValueError):
    """A ``list_jobs`` cursor that is malformed (intake answers 400)."""


class Store(Protocol):
    """What intake and worker need from persistence. All methods are coroutines.

    Construction does no I/O. ``open()`` connects and checks that the schema is at the
    version this code expects (``SchemaError`` otherwise); ``migrate()`` works on an
    opened or unopened store; ``close()`` is idempotent. ``async with store`` opens and
    closes. Any failure to reach or write the database raises ``StoreUnavailable``.
    """

    #: ``"sqlite"`` or ``"postgresql"``.
    engine: str

    async def open(self, *, migrate: bool = False) -> None:
        """Connect; with ``migrate=True`` apply missing migrations first."""
        ...

    async def close(self) -> None:
        """Release every connection and thread; safe to call twice or before ``open``."""
        ...

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def migrate(self, target: int | None = None) -> list[str]:
        """Apply missing migrations (up to version ``target``); return their names."""
        ...

    async def schema_version(self) -> int:
        """The highest applied migration version (0 for an empty database)."""
        ...

    async def ping(self) -> None:
        """Readiness: return when the database answers, raise ``StoreUnavailable`` if not."""
        ...

    async def wait_for_work(self, timeout_s: float) -> bool:
        """Sleep until a job may be claimable or ``timeout_s`` passed.

        Returns ``True`` when woken because work may be due, ``False`` on timeout. Wakes
        early on enqueue/release/retry/finish notifications and when the earliest
        scheduled retry comes due; a claim after a ``False`` is still the guarantee.
        """
        ...

    # -- intake ---------------------------------------------------------------------------

    async def enqueue(self, new: NewJob) -> EnqueueResult:
        """Create a job, or return the live/idempotent one it duplicates (committed on return)."""
        ...

    async def record_rejection(self, source: str, reason: str, detail: Mapping[str, Any]) -> None:
        """Audit a request that was refused (e.g. 403: app not allowed for this source)."""
        ...

    async def cancel(self, job_id: str, reason: str, by: str) -> Job:
        """Cancel a queued/waiting job (``InvalidTransition`` otherwise)."""
        ...

    async def cancel_by_idempotency_key(
        self, source: str, key: str, reason: str, by: str
    ) -> Job | None:
        """Cancel the job an idempotency key maps to; ``None`` when the key is unknown."""
        ...

    # -- worker ---------------------------------------------------------------------------

    async def claim(self, owner: str, lease_s: float, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due jobs, oldest due first, at most one per app."""
        ...

    async def heartbeat(self, job_id: str, token: str, lease_s: float) -> datetime:
        """Extend the lease to now + ``lease_s``; return the new expiry."""
        ...

    async def record_attempt(self, job_id: str, token: str, attempt: AttemptIn) -> int:
        """Store one SAE call; return its number."""
        ...

    async def set_target(
        self,
        job_id: str,
        token: str,
        *,
        change_order_id: str | None = None,
        app_id: str | None = None,
    ) -> Job:
        """Fill in the change order / app the worker resolved (raises ``TargetConflict``)."""
        ...

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
        """Move to verifying/succeeded/failed/skipped; terminal ends the lease.

        ``attempt``: the SAE call that decided this, recorded in the same transaction
        (one commit instead of two, and never an attempt without its outcome).
        """
        ...

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
        """Put the job in ``waiting`` until now + ``delay_s`` (or ``at``); end the lease.

        ``attempt``: the failed SAE call, recorded in the same transaction.
        """
        ...

    async def release(self, job_id: str, token: str, *, reconcile: bool = False) -> Job:
        """Give the job back, due now (graceful drain); end the lease."""
        ...

    async def rescue_expired(self, max_interrupts: int) -> int:
        """Take back jobs whose lease expired; return how many.

        Each take-back increments the job's ``interrupted_count`` and marks it for
        reconcile; the one that brings the count to ``max_interrupts`` fails the job
        (``error_code`` ``interrupted_too_often``) instead of requeueing it. Claims made
        for ordinary retries (``attempt_count``) do not count.
        """
        ...

    async def take_call_tokens(
        self, bucket: str, rate_per_minute: float, burst: float, n: float = 1.0
    ) -> float:
        """Token bucket shared by every process: 0 if granted, else seconds to wait."""
        ...

    # -- results API / metrics / retention ------------------------------------------------

    async def get(self, job_id: str) -> Job:
        """The job with its attempts (``JobNotFound`` if there is none)."""
        ...

    async def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        app_id: str | None = None,
        source: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Newest first, keyset-paginated; ``InvalidCursor`` for a malformed cursor."""
        ...

    async def audit(self, job_id: str) -> list[AuditEvent]:
        """The job's audit trail, oldest first (``JobNotFound`` if there is no such job)."""
        ...

    async def rejections(self, limit: int = 100) -> list[AuditEvent]:
        """The newest audit rows that belong to no job (refused requests), newest first."""
        ...

    async def stats(self) -> QueueStats:
        """Counts per status and the age of the oldest due job."""
        ...

    async def maintain(self) -> bool:
        """Engine housekeeping the worker runs every minute; ``True`` if it did anything.

        PostgreSQL: refresh the planner statistics of ``jobs`` when they are missing or
        stale (a server with autovacuum off never gets any, and without them the claim
        plan sorts the whole backlog). SQLite: ``PRAGMA optimize``.
        """
        ...

    async def prune(self, finished_before: datetime) -> int:
        """Delete terminal jobs finished before the cutoff (with attempts, audit, keys)."""
        ...


# -- helpers shared by the engines ---------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned schema change: ``sql/<engine>/NNNN_name.sql``."""

    version: int
    name: str
    sql: str


def load_migrations(engine: str) -> list[Migration]:
    """The engine's migrations in version order; versions must be 1, 2, 3, ... exactly."""
    folder = resources.files("orchestrator.store").joinpath("sql", engine)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(int(match.group(1)), entry.name.removesuffix(".sql"), entry.read_text())
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations of {engine} are not numbered 1..N: {versions}")
    return found


def check_schema_version(applied: int, latest: int) -> None:
    """Raise ``SchemaError`` unless ``applied`` is exactly the version this code knows."""
    if applied == 0:
        raise SchemaError("the store has no schema: run `sae-rollback migrate`")
    if applied < latest:
        raise SchemaError(
            f"the store schema is at version {applied}, this code needs {latest}: "
            "run `sae-rollback migrate`"
        )
    if applied > latest:
        raise SchemaError(
            f"the store schema is at version {applied}, newer than this code knows "
            f"({latest}): upgrade sae-rollback"
        )


_CURSOR_PREFIX: Final = "j1:"


def encode_cursor(seq: int) -> str:
    """An opaque cursor pointing just after the job with insertion sequence ``seq``."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence number inside a cursor from :func:`encode_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursor(f"malformed cursor {cursor!r}") from exc
    if not raw.startswith(_CURSOR_PREFIX) or not raw[len(_CURSOR_PREFIX) :].isdigit():
        raise InvalidCursor(f"malformed cursor {cursor!r}")
    return int(raw[len(_CURSOR_PREFIX) :])


def check_limit(limit: int, maximum: int, what: str) -> None:
    """Reject a page/claim size outside ``1..maximum`` (a caller bug, not a store error)."""
    if not 1 <= limit <= maximum:
        raise ValueError(f"{what} must be between 1 and {maximum}, got {limit}")


def check_positive(value: float, what: str) -> None:
    """Reject a non-positive duration or rate."""
    if not value > 0:
        raise ValueError(f"{what} must be > 0, got {value}")


def budget_wait_s(tokens_after: float, granted: bool, rate_per_minute: float, n: float) -> float:
    """Seconds until ``n`` tokens will be available, given the bucket after this request."""
    if granted:
        return 0.0
    return max(0.0, (n - tokens_after) * 60.0 / rate_per_minute)


def check_budget_args(rate_per_minute: float, burst: float, n: float) -> None:
    """Reject a token-bucket request that could never be granted."""
    check_positive(rate_per_minute, "rate_per_minute")
    check_positive(burst, "burst")
    check_positive(n, "n")
    if n > burst:
        raise ValueError(f"n ({n}) exceeds the bucket size burst ({burst}): never grantable")


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return rfc3339(value) or ""
    return str(value)


def audit_json(detail: Mapping[str, Any]) -> str:
    """An audit row's detail as JSON text (datetimes as RFC 3339, keys sorted)."""
    return json.dumps(dict(detail), sort_keys=True, default=_json_default)

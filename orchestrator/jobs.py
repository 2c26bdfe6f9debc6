"""The rollback job model: statuses, legal transitions and the value types the store returns.

Pure data, no I/O, and no imports from the rest of the package: the store, the intake and
the worker all speak in these types, so they must not depend on any of them.

Lifecycle (see design.md, "Job states")::

    queued ──claim──► running ──► verifying ──► succeeded
      ▲                 │  │          │  └─────► failed
      │                 │  │          └──────────► waiting / queued   (retry, release, rescue)
      └── waiting ◄─────┘  ├──────────────────► failed / skipped / succeeded
                           └─ release / rescue ─► queued (nothing called yet) or waiting
    queued / waiting ──cancel──► cancelled

Three counters live on a job and must not be confused:

* ``attempt_count`` — how many times the job was *claimed*. It is incremented at claim
  time, before any side effect. It also grows with every ordinary retry (one claim per
  busy probe), so it says nothing about whether runs were cut short.
* ``interrupted_count`` — how many times lease rescue took the job back from a worker
  that died or hung (its lease expired). ``rescue_expired(max_interrupts)`` fails the job
  when it reaches the limit, so a job that kills its worker every time still ends.
* ``call_count`` — how many SAE calls were recorded (rows in ``attempts``); the contract's
  ``attempts[].number`` is this sequence. ``first_attempt_at`` is the start of the first
  of them (the retry budget's elapsed time is measured from it).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final


class JobStatus(StrEnum):
    """Where a job is in its lifecycle; the values are the contract's status strings."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    VERIFYING = "verifying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def is_live(self) -> bool:
        """Whether the job still counts against "one live job per change order"."""
        return self in LIVE

    @property
    def is_terminal(self) -> bool:
        """Whether the job is finished for good."""
        return self in TERMINAL


LIVE: Final = frozenset(
    {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.WAITING, JobStatus.VERIFYING}
)
TERMINAL: Final = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SKIPPED}
)
#: Statuses in which a worker holds a lease (and the app is "busy").
ACTIVE: Final = frozenset({JobStatus.RUNNING, JobStatus.VERIFYING})
#: Statuses from which a job can be claimed (``waiting`` only once ``next_attempt_at`` passed).
CLAIMABLE: Final = frozenset({JobStatus.QUEUED, JobStatus.WAITING})

#: Every legal status change. The store enforces these in SQL (the ``WHERE status IN ...``
#: of each write) and the unit tests check that the SQL and this table agree.
TRANSITIONS: Final[Mapping[JobStatus, frozenset[JobStatus]]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.WAITING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.VERIFYING,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.SKIPPED,
            JobStatus.WAITING,
            JobStatus.QUEUED,
        }
    ),
    JobStatus.VERIFYING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.WAITING, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.SKIPPED: frozenset(),
}

#: Targets a worker may ask for with ``Store.transition``; moving back to the queue goes
#: through ``schedule_retry`` / ``release`` instead, because those also clear the lease.
WORKER_TARGETS: Final = frozenset(
    {JobStatus.VERIFYING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SKIPPED}
)


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    """Whether a job in ``current`` may move to ``target``."""
    return target in TRANSITIONS[current]


def sources_for(target: JobStatus) -> frozenset[JobStatus]:
    """The statuses from which ``target`` can be reached (used to build guarded updates)."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


class AttemptOutcome(StrEnum):
    """What one SAE call meant for the job."""

    RETRY = "retry"
    SUCCESS = "success"
    FAILED = "failed"


class AuditKind(StrEnum):
    """The decisions recorded in the append-only audit trail."""

    ACCEPTED = "accepted"
    DEDUPLICATED = "deduplicated"
    REJECTED = "rejected"
    CLAIMED = "claimed"
    TARGET_SET = "target_set"
    VERIFYING = "verifying"
    RETRIED = "retried"
    RELEASED = "released"
    RESCUED = "rescued"
    CANCELLED = "cancelled"
    FINISHED = "finished"


def new_job_id() -> str:
    """A fresh job id: a UUIDv7 (time-ordered, so ids sort roughly by creation)."""
    ms = time.time_ns() // 1_000_000
    rand = secrets.randbits(74)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= (rand >> 62) << 64  # 12 random bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def rfc3339(moment: datetime | None) -> str | None:
    """``moment`` as an RFC 3339 UTC string with milliseconds (``...T12:00:00.123Z``)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_optional_text(name: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{name} must be a non-empty string or None")


@dataclass(frozen=True, slots=True)
class NewJob:
    """What intake submits: one rollback request for a change order and/or an app."""

    region: str
    source: str
    change_order_id: str | None = None
    app_id: str | None = None
    reason: str = ""
    requested_by: str = ""
    dry_run: bool = False
    #: Replay protection, scoped by ``source``: the same key always maps to the same job,
    #: even after that job finished (until ``prune`` removes it).
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        if self.change_order_id is None and self.app_id is None:
            raise ValueError("a job needs a change_order_id or an app_id")
        _check_optional_text("change_order_id", self.change_order_id)
        _check_optional_text("app_id", self.app_id)
        _check_optional_text("idempotency_key", self.idempotency_key)
        if not self.region.strip():
            raise ValueError("region must not be empty")
        if not self.source.strip():
            raise ValueError("source must not be empty")


@dataclass(frozen=True, slots=True)
class AttemptIn:
    """One SAE call as the worker reports it; the store assigns the number."""

    action: str
    started_at: datetime
    duration_ms: int
    outcome: AttemptOutcome
    http_status: int | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    trace_id: str | None = None

    def __post_init__(self) -> None:
        # Checked here, not by the database: stores write several callers' attempts in one
        # statement, and one out-of-range value must not fail the others' writes.
        if self.started_at.tzinfo is None:
            raise ValueError("started_at must be timezone-aware")
        if not 0 <= self.duration_ms < 2**31:
            raise ValueError(f"duration_ms out of range: {self.duration_ms}")
        if self.http_status is not None and not 100 <= self.http_status <= 599:
            raise ValueError(f"http_status out of range: {self.http_status}")
        if not self.action:
            raise ValueError("action must not be empty")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One recorded SAE call of a job."""

    number: int
    #: The claim (``attempt_count`` at the time) during which the call was made.
    run: int
    action: str
    started_at: datetime
    duration_ms: int
    outcome: AttemptOutcome
    http_status: int | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    trace_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The attempt as it appears in the contract's job JSON."""
        return {
            "number": self.number,
            "action": self.action,
            "started_at": rfc3339(self.started_at),
            "duration_ms": self.duration_ms,
            "http_status": self.http_status,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "outcome": str(self.outcome),
        }


@dataclass(frozen=True, slots=True)
class Job:
    """A rollback job as stored (every column), with its attempts when loaded by ``get``."""

    id: str
    change_order_id: str | None
    app_id: str | None
    region: str
    status: JobStatus
    source: str
    reason: str
    requested_by: str
    dry_run: bool
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    #: When the job is (or was) due: set while queued/waiting, ``None`` otherwise.
    next_attempt_at: datetime | None
    error_code: str | None
    error_message: str | None
    attempt_count: int
    call_count: int
    #: A previous run may have reached SAE without recording the outcome (lease expired,
    #: or the worker said so): read the change order's state before calling again.
    needs_reconcile: bool
    #: The last worker that claimed the job (kept after the lease ends, for forensics).
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    #: Runs cut short by an expired lease (rescued); see the module docstring.
    interrupted_count: int = 0
    #: When the first SAE call of the job started (``None`` until one is recorded).
    first_attempt_at: datetime | None = None
    attempts: tuple[Attempt, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The job in exactly the JSON shape of contract.md ("The job")."""
        error = None
        if self.error_code is not None or self.error_message is not None:
            error = {"code": self.error_code, "message": self.error_message}
        return {
            "id": self.id,
            "change_order_id": self.change_order_id,
            "app_id": self.app_id,
            "region": self.region,
            "status": str(self.status),
            "source": self.source,
            "reason": self.reason,
            "requested_by": self.requested_by,
            "dry_run": self.dry_run,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "finished_at": rfc3339(self.finished_at),
            "next_attempt_at": rfc3339(self.next_attempt_at),
            "error": error,
            "attempts": [a.to_dict() for a in self.attempts],
        }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One row of the append-only audit trail."""

    id: int
    job_id: str | None
    at: datetime
    event: AuditKind
    #: Who made the decision: the source for intake events, the worker for worker events.
    actor: str | None
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job handed to a worker: every later write must present ``token``."""

    job: Job
    token: str
    lease_expires_at: datetime


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """The job a request maps to, and whether it already existed."""

    job: Job
    deduplicated: bool


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ``list_jobs`` (newest first); ``next_cursor`` is ``None`` on the last."""

    items: tuple[Job, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts per status (every status present, zeros included) and queue latency."""

    counts: Mapping[JobStatus, int]
    #: Seconds the oldest *due* unclaimed job (queued, or waiting past its
    #: ``next_attempt_at``) has been due; 0 when nothing is due.
    oldest_queued_age_s: float

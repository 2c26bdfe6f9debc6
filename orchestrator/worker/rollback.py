"""One job's flow, from claim to the store write that ends the run (issue 4, "Each job's flow").

A run starts with a claimed job (lease token in hand) and ends with exactly one of:
a terminal ``transition`` (succeeded / failed / skipped), ``schedule_retry`` (the job waits in
the store, visible with ``next_attempt_at``), ``release`` (drain: due again at once), or
nothing at all when the lease was lost (another worker owns the job; every write is fenced).

The steps::

    history  call_count > 0 or needs_reconcile: load the stored attempts
    dry run  record the calls it would make, call nothing -> skipped
    accepted an abort was accepted in an earlier run -> verify (or succeeded)
    resolve  app only: DescribeApplicationStatus (LastChangeOrderId while running), else
             ListChangeOrders for a non-terminal order; none -> skipped; set_target
    check    DescribeChangeOrder on the first run and whenever an earlier abort may have
             taken effect (reconcile): terminal -> skipped (6 after a possible abort ->
             succeeded); SupportRollback false -> failed
    abort    AbortAndRollbackChangeOrder: accepted -> verify; Not.Running -> read the
             state and finish (verify / succeeded / skipped); busy, throttled, server,
             transport -> schedule_retry (policy in retry.py); permanent -> failed
    verify   DescribeChangeOrder every poll_interval_s until terminal or timeout_s:
             6 -> succeeded, anything else -> failed with what SAE reported

Never two accepted aborts: after an ambiguous outcome (read timeout, reset, 5xx, garbage)
the job is scheduled with ``reconcile=True``; the next run reads the order first, and the
flag is carried over every later retry until an answer settles it (accepted, Not.Running,
or a terminal state). A second abort of an order whose first abort took effect is refused
by SAE with ``Application.ChangerOrder.Not.Running``, which this flow treats as "check the
state", never as a failure. A worker killed mid-call leaves no attempt row; lease rescue
sets ``needs_reconcile`` and the next run reconciles the same way.

Every SAE call is recorded as an attempt (with ``RequestId``/``TraceId`` whenever SAE sent
them, failures included) before the flow acts on its result. When the flow's next act is
the write that ends the run (or moves it to verifying), the attempt travels *in* that write
(``transition(..., attempt=)`` / ``schedule_retry(..., attempt=)``: one commit, and never
an attempt without its outcome); otherwise it is written on its own first (before the next
call, ``set_target``, a verification pause or a release), which also confirms the lease
before anything else reaches SAE.

``FlowDeps.call_slots`` bounds the SAE calls in flight across all runs of the worker
(``[worker] concurrency``): a run holds a slot only while its call is on the wire, not while
it writes to the store or sleeps between verification polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Protocol, TypeVar

import structlog
import tenacity

from orchestrator.errors import LeaseLost, StoreError, StoreUnavailable
from orchestrator.jobs import (
    Attempt,
    AttemptIn,
    AttemptOutcome,
    AuditKind,
    Claimed,
    Job,
    JobStatus,
)
from orchestrator.logging import get_logger
from orchestrator.metrics import Metrics
from orchestrator.sae.errors import (
    SaeCallError,
    SaeNotRunning,
    SaePermanentError,
    SaeThrottled,
    is_ambiguous,
)
from orchestrator.sae.models import (
    AbortResult,
    AppStatus,
    CallOutcome,
    ChangeOrder,
    ChangeOrderPage,
    ChangeOrderStatus,
)
from orchestrator.store.base import AppBusy, DuplicateTarget, Store
from orchestrator.worker.breaker import CircuitBreaker, CircuitOpen, Permit
from orchestrator.worker.budget import CallBudget, Priority
from orchestrator.worker.retry import RetryPolicy, is_retryable, retry_reason

__all__ = [
    "ABORT",
    "APP_STATUS",
    "DESCRIBE",
    "LIST",
    "Drained",
    "FlowDeps",
    "JobRun",
    "RunResult",
    "SaeApi",
]

T = TypeVar("T")

ABORT: Final = "AbortAndRollbackChangeOrder"
DESCRIBE: Final = "DescribeChangeOrder"
LIST: Final = "ListChangeOrders"
APP_STATUS: Final = "DescribeApplicationStatus"
#: ``code`` of the attempt rows a dry run records.
DRY_RUN_CODE: Final = "DryRun"
#: How many of an app's newest change orders the resolver looks at.
RESOLVE_PAGE_SIZE: Final = 20
#: Pause of this process after a throttling answer without a retry-after.
THROTTLE_PAUSE_S: Final = 1.0
#: ``error_code`` of a run that ended in an unexpected exception.
INTERNAL_ERROR: Final = "internal_error"
#: ``error_code`` (and retry reason) of a job put back because the circuit breaker is open.
CIRCUIT_OPEN: Final = "circuit_open"

log = get_logger("orchestrator.worker")


class SaeApi(Protocol):
    """The SAE client calls the flow needs (``orchestrator.sae.SaeClient`` provides them)."""

    async def abort_and_rollback(self, change_order_id: str) -> AbortResult: ...

    async def describe_change_order(self, change_order_id: str) -> ChangeOrder: ...

    async def list_change_orders(
        self,
        app_id: str,
        co_status: int | None = None,
        page: int = 1,
        page_size: int = 20,
        co_type: str | None = None,
    ) -> ChangeOrderPage: ...

    async def describe_application_status(self, app_id: str) -> AppStatus: ...


class RunResult(StrEnum):
    """How a run ended (the job's status says where it is now)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    RETRY = "retry"  # waiting in the store until next_attempt_at
    RELEASED = "released"  # drained: due again at once
    LOST = "lost"  # the lease was taken away; nothing written
    ABANDONED = "abandoned"  # the store could not be written; lease expiry recovers it


class Drained(Exception):
    """Raised at a safe point (before a call, during a pause) once the worker drains."""


@dataclass(slots=True)
class FlowDeps:
    """What every run shares: collaborators, settings, and the worker's live state."""

    store: Store
    client: SaeApi
    budget: CallBudget
    metrics: Metrics
    policy: RetryPolicy
    owner: str
    lease_s: float
    max_attempts: int
    verify_enabled: bool
    verify_poll_interval_s: float
    verify_timeout_s: float
    #: Set when the worker drains: runs stop at their next safe point.
    draining: asyncio.Event
    #: How many jobs are waiting for a retry right now (shares the busy-probe budget).
    waiting_jobs: Callable[[], int]
    wall_clock: Callable[[], datetime]
    monotonic: Callable[[], float]
    #: Bounds the SAE calls in flight across the worker's runs (``None``: unbounded).
    call_slots: asyncio.Semaphore | None = None
    #: Stops all calls while SAE keeps failing (``None``: never).
    breaker: CircuitBreaker | None = None


def _status_text(status: int | None) -> str:
    if status is None:
        return "unknown"
    try:
        return f"{status} ({ChangeOrderStatus(status).name.lower()})"
    except ValueError:
        return str(status)


class JobRun:
    """One claimed job, driven to the store write that ends this run."""

    def __init__(self, deps: FlowDeps, claimed: Claimed) -> None:
        self.d = deps
        self.job: Job = claimed.job
        self.token = claimed.token
        self.attempts: list[Attempt] = []
        #: An earlier abort may have taken effect: read the state before calling again.
        self.maybe_accepted = claimed.job.needs_reconcile
        #: True while an SAE call is on the wire (a cancelled call is ambiguous).
        self.in_call = False
        #: Set by the worker when a heartbeat found the lease gone.
        self.lease_lost = False
        #: Set just before the final write: heartbeats must not mistake it for a lost lease.
        self.settling = False
        self.calls_this_run = 0
        #: Whether ``run`` began (a task cancelled before its first step never does).
        self.started = False
        #: Nothing was called for this job before: its calls have first-call priority.
        self._first_run = claimed.job.call_count == 0 and not claimed.job.needs_reconcile
        self._last_call_started = 0.0
        #: Start of the job's first SAE call (stored; set here when this run makes it): the
        #: retry budget's elapsed time is measured from it.
        self._first_call_at = claimed.job.first_attempt_at
        #: The last call's attempt, not yet written: the next write carries it (or flushes).
        self._unrecorded: AttemptIn | None = None
        self._log = log

    # -- entry ------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        """Drive the job; never raises except ``CancelledError`` (after releasing the lease)."""
        self.started = True
        job = self.job
        with structlog.contextvars.bound_contextvars(
            job_id=job.id,
            change_order_id=job.change_order_id,
            app_id=job.app_id,
            attempt=job.attempt_count,
        ):
            try:
                return await self._run()
            except Drained:
                return await self._release(reconcile=self.maybe_accepted, why="drain")
            except CircuitOpen as exc:
                return await self._wait_for_circuit(exc)
            except LeaseLost as exc:
                self._log.warning("lease_lost", error=str(exc))
                return RunResult.LOST
            except asyncio.CancelledError:
                if not self.lease_lost and not self.settling:
                    # Give the job back before unwinding (the worker cancels once and waits
                    # for this). The call in flight, if any, may have reached SAE: reconcile.
                    reconcile = self.in_call or self.maybe_accepted
                    with contextlib.suppress(Exception):
                        await self._release(reconcile=reconcile, why="cancelled")
                raise
            except StoreError as exc:
                # The store is down (or refused): leave the job to lease expiry and rescue,
                # which marks it for reconcile; releasing is tried once, best effort.
                self._log.error("job_abandoned", error=str(exc))
                with contextlib.suppress(Exception):
                    await self.d.store.release(self.job.id, self.token, reconcile=True)
                return RunResult.ABANDONED
            except Exception as exc:
                self._log.exception("job_crashed")
                return await self._crashed(exc)

    async def _run(self) -> RunResult:
        job = self.job
        if job.call_count > 0 or job.needs_reconcile:
            history = await self._write(lambda: self.d.store.get(job.id))
            self.attempts = list(history.attempts)
        self._log.info(
            "job_claimed",
            status=str(job.status),
            calls=job.call_count,
            reconcile=job.needs_reconcile,
            dry_run=job.dry_run,
        )
        if job.dry_run:
            return await self._dry_run()
        accepted = self._accepted_abort()
        if accepted is not None:
            # An earlier run got the abort accepted (then was drained or died): only the
            # verification is left; calling again would only get Not.Running.
            return await self._after_accept(accepted.started_at, poll_now=True)

        change_order_id = job.change_order_id
        if change_order_id is None:
            resolved = await self._resolve()
            if isinstance(resolved, RunResult):
                return resolved
            change_order_id = resolved

        prechecked = any(
            a.action == DESCRIBE and a.outcome is AttemptOutcome.SUCCESS for a in self.attempts
        )
        if not prechecked or self.maybe_accepted or self.job.app_id is None:
            checked = await self._precheck(change_order_id)
            if checked is not None:
                return checked
        return await self._abort(change_order_id)

    # -- steps ------------------------------------------------------------------------------

    async def _resolve(self) -> str | RunResult:
        """The running change order of an app-only job, set as the job's target."""
        app_id = self.job.app_id
        assert app_id is not None  # a job has a change order or an app (NewJob checks it)
        try:
            status = await self._call(
                APP_STATUS, lambda: self.d.client.describe_application_status(app_id)
            )
        except SaeCallError as exc:
            return await self._call_failed(exc)
        change_order_id = status.last_change_order_id if status.last_change_order_running else None
        if change_order_id is None:
            try:
                page = await self._call(
                    LIST,
                    lambda: self.d.client.list_change_orders(app_id, page_size=RESOLVE_PAGE_SIZE),
                )
            except SaeCallError as exc:
                return await self._call_failed(exc)
            # Newest first: the most recent order still running or waiting (paused batch,
            # approval) is the one a rollback request for this app means.
            for item in page.items:
                if item.change_order_id and item.status is not None and not item.is_terminal:
                    change_order_id = item.change_order_id
                    break
        if change_order_id is None:
            return await self._finish(
                JobStatus.SKIPPED,
                "nothing_to_roll_back",
                f"app {app_id} has no running or waiting change order",
            )
        try:
            await self._flush_attempt()
            self.job = await self._write(
                lambda: self.d.store.set_target(
                    self.job.id, self.token, change_order_id=change_order_id
                )
            )
        except DuplicateTarget as exc:
            return await self._finish(
                JobStatus.SKIPPED,
                "duplicate",
                f"change order {change_order_id} already has live job {exc.existing_job_id}",
            )
        structlog.contextvars.bind_contextvars(change_order_id=change_order_id)
        self._log.info("job_target_resolved", change_order_id=change_order_id)
        return change_order_id

    async def _precheck(self, change_order_id: str) -> RunResult | None:
        """DescribeChangeOrder before aborting; a result ends the run, ``None`` goes on."""
        try:
            order = await self._call(
                DESCRIBE, lambda: self.d.client.describe_change_order(change_order_id)
            )
        except SaeCallError as exc:
            return await self._call_failed(exc)
        if self.job.app_id is not None and order.app_id and order.app_id != self.job.app_id:
            # Intake checked the source's allowed_apps against the app the request named;
            # a change order of another app must not ride on that permission.
            return await self._finish(
                JobStatus.FAILED,
                "app_mismatch",
                f"change order {change_order_id} belongs to app {order.app_id}, "
                f"not to {self.job.app_id} named in the request",
            )
        if self.job.app_id is None and order.app_id:
            # Only now is the app known: take the per-app lock before any abort.
            await self._flush_attempt()
            try:
                self.job = await self._write(
                    lambda: self.d.store.set_target(self.job.id, self.token, app_id=order.app_id)
                )
            except AppBusy as exc:
                return await self._retry_later(
                    "app_busy", f"app {order.app_id} has active job {exc.running_job_id}"
                )
            structlog.contextvars.bind_contextvars(app_id=order.app_id)
        if order.is_terminal:
            if self.maybe_accepted and order.status == ChangeOrderStatus.ABORTED:
                self._log.info("job_reconciled", order_status=order.status)
                return await self._finish(JobStatus.SUCCEEDED)
            return await self._finish(
                JobStatus.SKIPPED,
                "already_terminal",
                f"change order {change_order_id} is already terminal: status "
                f"{_status_text(order.status)}",
            )
        if order.support_rollback is False:
            return await self._finish(
                JobStatus.FAILED,
                "rollback_not_supported",
                f"change order {change_order_id} does not support rollback "
                "(SupportRollback is false)",
            )
        return None

    async def _abort(self, change_order_id: str) -> RunResult:
        try:
            result = await self._call(
                ABORT, lambda: self.d.client.abort_and_rollback(change_order_id)
            )
        except SaeNotRunning:
            return await self._settle_not_running(change_order_id)
        except SaeCallError as exc:
            return await self._call_failed(exc)
        self.maybe_accepted = False
        self._log.info("abort_accepted", request_id=result.outcome.request_id)
        return await self._after_accept(result.outcome.started_at, poll_now=False)

    async def _settle_not_running(self, change_order_id: str) -> RunResult:
        """Not.Running: an earlier abort took effect, or the order ended. Read and finish."""
        try:
            order = await self._call(
                DESCRIBE, lambda: self.d.client.describe_change_order(change_order_id)
            )
        except SaeCallError as exc:
            # Still unsettled: keep the reconcile mark for the next run.
            self.maybe_accepted = True
            return await self._call_failed(exc)
        self.maybe_accepted = False
        if order.status == ChangeOrderStatus.ABORTED:
            self._log.info("job_reconciled", order_status=order.status)
            return await self._finish(JobStatus.SUCCEEDED)
        if order.is_terminal:
            return await self._finish(
                JobStatus.SKIPPED,
                "already_terminal",
                f"change order {change_order_id} ended before the abort: status "
                f"{_status_text(order.status)}",
            )
        # Not terminal but not abortable: the rollback an earlier abort started is running.
        self._log.info("job_reconciled", order_status=order.status)
        return await self._after_accept(order.outcome.started_at, poll_now=False)

    async def _after_accept(self, accepted_at: datetime, *, poll_now: bool) -> RunResult:
        if not self.d.verify_enabled:
            return await self._finish(JobStatus.SUCCEEDED)
        if self.job.status is not JobStatus.VERIFYING:
            attempt = self._take_attempt()
            self.job = await self._write(
                lambda: self.d.store.transition(
                    self.job.id, self.token, JobStatus.VERIFYING, attempt=attempt
                )
            )
            self._log.info("job_verifying")
        return await self._verify(accepted_at, poll_now=poll_now)

    async def _verify(self, accepted_at: datetime, *, poll_now: bool) -> RunResult:
        """Poll DescribeChangeOrder until the rollback is terminal or the timeout passes."""
        change_order_id = self.job.change_order_id
        assert change_order_id is not None  # verification follows an abort of that order
        deadline = accepted_at + timedelta(seconds=self.d.verify_timeout_s)
        last = "no answer yet"
        pause = 0.0 if poll_now else self.d.verify_poll_interval_s
        while True:
            remaining = (deadline - self.d.wall_clock()).total_seconds()
            if remaining <= 0:
                return await self._finish(
                    JobStatus.FAILED,
                    "verify_timeout",
                    f"the rollback of {change_order_id} was not finished after "
                    f"{self.d.verify_timeout_s:g} s; last status: {last}",
                )
            await self._flush_attempt()  # the last poll is on record before the pause
            await self._pause(min(pause, remaining))
            pause = self.d.verify_poll_interval_s
            try:
                order = await self._call(
                    DESCRIBE,
                    lambda: self.d.client.describe_change_order(change_order_id),
                    priority=Priority.POLL,
                )
            except CircuitOpen as exc:
                # The abort is done; keep the job (and its lease) and poll once SAE is back.
                pause = max(pause, exc.wait_s)
                last = "not polled: SAE calls paused by the circuit breaker"
                continue
            except SaePermanentError as exc:
                return await self._finish(JobStatus.FAILED, exc.code, self._message(exc))
            except SaeCallError as exc:
                reason = retry_reason(exc)
                if reason is not None:
                    self.d.metrics.retries.labels(reason=str(reason)).inc()
                if isinstance(exc, SaeThrottled) and exc.retry_after_s:
                    pause = max(pause, exc.retry_after_s)
                last = f"{exc.code}"
                continue
            last = _status_text(order.status)
            if order.is_terminal:
                if order.status == ChangeOrderStatus.ABORTED:
                    return await self._finish(JobStatus.SUCCEEDED)
                detail = f": {order.error_message}" if order.error_message else ""
                return await self._finish(
                    JobStatus.FAILED,
                    "rollback_failed",
                    f"change order {change_order_id} ended with status {last}{detail}",
                )

    async def _dry_run(self) -> RunResult:
        """Record the calls this job would make; call nothing."""
        job = self.job
        if job.change_order_id is not None:
            target = f"ChangeOrderId={job.change_order_id}"
            plan = [(DESCRIBE, target), (ABORT, target)]
        else:
            plan = [
                (APP_STATUS, f"AppId={job.app_id}"),
                (ABORT, f"ChangeOrderId=<the running change order of {job.app_id}>"),
            ]
        for action, params in plan:
            attempt = AttemptIn(
                action=action,
                started_at=self.d.wall_clock(),
                duration_ms=0,
                outcome=AttemptOutcome.SUCCESS,
                code=DRY_RUN_CODE,
                message=f"dry run: would call {action}({params}); not called",
            )
            await self._write(
                functools.partial(self.d.store.record_attempt, job.id, self.token, attempt)
            )
        return await self._finish(
            JobStatus.SKIPPED, "dry_run", "dry run: recorded the calls it would make, called none"
        )

    # -- one SAE call -------------------------------------------------------------------------

    async def _call(
        self,
        action: str,
        call: Callable[[], Awaitable[T]],
        *,
        priority: Priority | None = None,
    ) -> T:
        """Spend a budget token, make the call, record it as an attempt; raise its failure.

        Raises :class:`CircuitOpen` before spending anything while the breaker is open.
        """
        if priority is None:
            priority = Priority.FIRST if self._first_run else Priority.RETRY
        breaker = self.d.breaker
        if breaker is None:
            return await self._budgeted_call(call, priority, None)
        permit = breaker.permit()
        try:
            return await self._budgeted_call(call, priority, permit)
        finally:
            permit.abandon()  # no-op once the call reported its outcome

    async def _budgeted_call(
        self, call: Callable[[], Awaitable[T]], priority: Priority, permit: Permit | None
    ) -> T:
        if self.d.budget.limited:
            await self._until_drained(functools.partial(self.d.budget.acquire, priority))
        else:
            # Nothing to wait for: skip the two helper tasks a drain-aware wait costs.
            if self.d.draining.is_set():
                raise Drained
            await self.d.budget.acquire(priority)
        # The previous call's row is durable (and the lease confirmed) before this one goes out.
        await self._flush_attempt()
        slots = self.d.call_slots
        if slots is not None:
            await slots.acquire()
        try:
            # Waiting for a slot may have outlasted the start of a drain: no call starts then.
            if self.d.draining.is_set():
                raise Drained
            return await self._make_call(call, permit)
        finally:
            if slots is not None:
                slots.release()

    async def _make_call(self, call: Callable[[], Awaitable[T]], permit: Permit | None) -> T:
        """The call itself (a slot held): timing, the in-call mark, the attempt kept."""
        if self._first_run and self.calls_this_run == 0:
            waited = (self.d.wall_clock() - self.job.created_at).total_seconds()
            self.d.metrics.time_to_first_call.observe(max(0.0, waited))
        self.calls_this_run += 1
        self._last_call_started = self.d.monotonic()
        # in_call stays True if the call ends any other way (cancelled mid-call, a bug):
        # the run's handlers then treat the call as possibly having reached SAE.
        self.in_call = True
        try:
            result = await call()
        except SaeCallError as exc:
            self.in_call = False
            if permit is not None:
                permit.done(exc)
            outcome = AttemptOutcome.RETRY if is_retryable(exc) else AttemptOutcome.FAILED
            self._record(exc.outcome, outcome)
            if isinstance(exc, SaeThrottled):
                self.d.budget.pause(exc.retry_after_s or THROTTLE_PAUSE_S)
            raise
        self.in_call = False
        if permit is not None:
            permit.done(None)
        self._record(_outcome_of(result), AttemptOutcome.SUCCESS)
        return result

    def _record(self, call: CallOutcome, outcome: AttemptOutcome) -> None:
        """Keep the call as this run's unwritten attempt (see ``_flush_attempt``)."""
        if self._unrecorded is not None:
            raise RuntimeError("two SAE calls without the first one recorded")
        attempt = AttemptIn(
            action=call.action,
            started_at=call.started_at,
            duration_ms=max(0, round(call.duration_s * 1000)),
            outcome=outcome,
            http_status=call.http_status,
            code=call.code,
            message=call.message,
            request_id=call.request_id,
            trace_id=call.trace_id,
        )
        self._unrecorded = attempt
        if self._first_call_at is None:
            self._first_call_at = attempt.started_at
        # Every stored attempt of the job is in self.attempts (history is loaded whenever
        # call_count > 0), so the store will give this one the next number.
        self.attempts.append(
            Attempt(
                number=len(self.attempts) + 1,
                run=self.job.attempt_count,
                action=attempt.action,
                started_at=attempt.started_at,
                duration_ms=attempt.duration_ms,
                outcome=attempt.outcome,
                http_status=attempt.http_status,
                code=attempt.code,
                message=attempt.message,
                request_id=attempt.request_id,
                trace_id=attempt.trace_id,
            )
        )

    def _take_attempt(self) -> AttemptIn | None:
        """The unwritten attempt, for a write that records it along with its outcome."""
        attempt, self._unrecorded = self._unrecorded, None
        return attempt

    async def _flush_attempt(self) -> None:
        """Write the last call's attempt on its own (the flow goes on without ending)."""
        attempt = self._unrecorded
        if attempt is None:
            return
        await self._write(lambda: self.d.store.record_attempt(self.job.id, self.token, attempt))
        self._unrecorded = None

    async def _call_failed(self, exc: SaeCallError) -> RunResult:
        """A failed call (recorded already): fail on permanent errors, else schedule a retry."""
        reason = retry_reason(exc)
        if reason is None:
            return await self._finish(JobStatus.FAILED, exc.code, self._message(exc))
        if exc.outcome.action == ABORT and is_ambiguous(exc):
            # The abort may have taken effect although no answer said so.
            self.maybe_accepted = True
        first = self._first_call_at or exc.outcome.started_at
        elapsed = max(0.0, (self.d.wall_clock() - first).total_seconds())
        retries = sum(1 for a in self.attempts if a.outcome is AttemptOutcome.RETRY)
        decision = self.d.policy.decide(
            exc,
            retry_number=max(1, retries),
            elapsed_s=elapsed,
            since_call_start_s=self.d.monotonic() - self._last_call_started,
            # The gauge's count of waiting jobs (this one included, as it spends nearly all
            # of its time waiting); at least this job.
            waiting_jobs=max(1, self.d.waiting_jobs()),
        )
        if decision.delay_s is None:
            unknown = " (the last abort's outcome is unknown)" if self.maybe_accepted else ""
            return await self._finish(
                JobStatus.FAILED,
                "retry_budget_exhausted",
                f"gave up after {elapsed:.0f} s and {retries} retries{unknown}; "
                f"last answer: {exc.code}: {self._message(exc)}",
            )
        self.d.metrics.retries.labels(reason=str(reason)).inc()
        job = await self._schedule(
            decision.delay_s, exc.code, self._message(exc), reconcile=self.maybe_accepted
        )
        self._log.info(
            "job_retry_scheduled",
            reason=str(reason),
            code=exc.code,
            delay_s=round(decision.delay_s, 3),
            elapsed_s=round(elapsed, 3),
            retries=retries,
            reconcile=self.maybe_accepted,
            next_attempt_at=job.next_attempt_at,
        )
        return RunResult.RETRY

    async def _retry_later(
        self, code: str, message: str, *, delay_s: float | None = None, reason: str = "busy"
    ) -> RunResult:
        """A store-side wait with no failed SAE call behind it: the app is held by another
        of our jobs (``busy``), or the circuit breaker holds every call back."""
        delay = self.d.policy.initial_s if delay_s is None else delay_s
        self.d.metrics.retries.labels(reason=reason).inc()
        await self._schedule(delay, code, message, reconcile=self.maybe_accepted)
        self._log.info("job_retry_scheduled", reason=reason, code=code, delay_s=round(delay, 3))
        return RunResult.RETRY

    async def _schedule(
        self, delay_s: float, code: str | None, message: str, *, reconcile: bool
    ) -> Job:
        """End this run as ``waiting`` for ``delay_s``; the last call's row goes with it."""
        self.settling = True
        attempt = self._take_attempt()
        return await self._write(
            lambda: self.d.store.schedule_retry(
                self.job.id,
                self.token,
                delay_s=delay_s,
                error_code=code,
                error_message=message,
                reconcile=reconcile,
                attempt=attempt,
            )
        )

    async def _wait_for_circuit(self, exc: CircuitOpen) -> RunResult:
        """No call was made (the breaker is open): wait as ``circuit_open``, or give up when
        the wait would end past the retry budget (counted from the first call, or from the
        job's creation if the breaker kept it from making any)."""
        first = self._first_call_at or self.job.created_at
        elapsed = max(0.0, (self.d.wall_clock() - first).total_seconds())
        if elapsed + exc.wait_s > self.d.policy.max_elapsed_s:
            unknown = " (the last abort's outcome is unknown)" if self.maybe_accepted else ""
            return await self._finish(
                JobStatus.FAILED,
                "retry_budget_exhausted",
                f"gave up after {elapsed:.0f} s{unknown}: {exc}",
            )
        return await self._retry_later(
            CIRCUIT_OPEN, str(exc), delay_s=exc.wait_s, reason=CIRCUIT_OPEN
        )

    # -- endings ------------------------------------------------------------------------------

    async def _finish(
        self, status: JobStatus, code: str | None = None, message: str | None = None
    ) -> RunResult:
        self.settling = True
        attempt = self._take_attempt()
        job = await self._write(
            lambda: self.d.store.transition(
                self.job.id, self.token, status, code, message, attempt=attempt
            )
        )
        self.job = job
        finished = job.finished_at or self.d.wall_clock()
        self.d.metrics.jobs_finished.labels(status=str(status)).inc()
        self.d.metrics.job_duration.labels(status=str(status)).observe(
            max(0.0, (finished - job.created_at).total_seconds())
        )
        event = {
            JobStatus.SUCCEEDED: "job_succeeded",
            JobStatus.FAILED: "job_failed",
            JobStatus.SKIPPED: "job_skipped",
        }[status]
        fields: dict[str, Any] = {"calls": job.call_count}
        if code is not None:
            fields.update(error_code=code, error_message=message)
        if status is JobStatus.FAILED:
            self._log.warning(event, **fields)
        else:
            self._log.info(event, **fields)
        return RunResult(str(status))

    async def _release(self, *, reconcile: bool, why: str) -> RunResult:
        await self._flush_attempt()
        self.settling = True
        job = await self._write(
            lambda: self.d.store.release(self.job.id, self.token, reconcile=reconcile)
        )
        self._log.info("job_released", why=why, status=str(job.status), reconcile=reconcile)
        return RunResult.RELEASED

    async def _crashed(self, exc: Exception) -> RunResult:
        """A bug in this flow: retry later (reconciling), or fail after max_attempts claims."""
        message = f"{type(exc).__name__}: {exc}"[:500]
        try:
            crashes = 1 + await self._count_audit(AuditKind.RETRIED, error_code=INTERNAL_ERROR)
            if crashes >= self.d.max_attempts:
                return await self._finish(JobStatus.FAILED, INTERNAL_ERROR, message)
            delay = min(
                self.d.policy.max_interval_s,
                self.d.policy.initial_s * 2 ** min(crashes, 16),
            )
            await self._schedule(delay, INTERNAL_ERROR, message, reconcile=True)
        except Exception:
            # Lease expiry and rescue take over; the job is not lost.
            self._log.exception("job_abandoned")
            return RunResult.ABANDONED
        return RunResult.RETRY

    # -- helpers --------------------------------------------------------------------------------

    async def _count_audit(self, kind: AuditKind, *, error_code: str | None = None) -> int:
        """How many audit events of ``kind`` (with that ``error_code``) the job has."""
        events = await self._write(lambda: self.d.store.audit(self.job.id))
        return sum(
            1
            for event in events
            if event.event == kind
            and (error_code is None or event.detail.get("error_code") == error_code)
        )

    def _accepted_abort(self) -> Attempt | None:
        for attempt in self.attempts:
            if (
                attempt.action == ABORT
                and attempt.outcome is AttemptOutcome.SUCCESS
                and attempt.code != DRY_RUN_CODE
            ):
                return attempt
        return None

    async def _write(self, op: Callable[[], Awaitable[T]]) -> T:
        """A store call, retried briefly while the store is unavailable (never on LeaseLost)."""
        try:
            # The common case without tenacity's per-call bookkeeping (several per job).
            return await op()
        except StoreUnavailable as exc:
            self._log.warning("store_write_retrying", error=str(exc))

        async def attempt() -> T:
            # tenacity awaits only coroutine functions, not callables returning awaitables.
            return await op()

        # Built only here: constructing it costs more than a store write on the hot path.
        store_retry = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
            stop=tenacity.stop_after_delay(max(1.0, self.d.lease_s / 2.0)),
            reraise=True,
        )
        result: T = await store_retry(attempt)
        return result

    async def _pause(self, seconds: float) -> None:
        """Sleep, but end at once with ``Drained`` when the worker drains."""
        if self.d.draining.is_set():
            raise Drained
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.d.draining.wait(), seconds)
        if self.d.draining.is_set():
            raise Drained

    async def _until_drained(self, start: Callable[[], Awaitable[T]]) -> T:
        """Await ``start()`` unless the worker starts draining first (then ``Drained``)."""
        if self.d.draining.is_set():
            raise Drained
        task = asyncio.ensure_future(start())
        drained = asyncio.ensure_future(self.d.draining.wait())
        try:
            await asyncio.wait({task, drained}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled() or not task.done():
            raise Drained
        if self.d.draining.is_set() and task.exception() is None:
            # Granted just as the drain began: no call starts once draining.
            raise Drained
        return task.result()

    @staticmethod
    def _message(exc: SaeCallError) -> str:
        return exc.outcome.message or str(exc)


def _outcome_of(result: object) -> CallOutcome:
    outcome = getattr(result, "outcome", None)
    if not isinstance(outcome, CallOutcome):
        raise TypeError(f"SAE result without a CallOutcome: {type(result).__name__}")
    return outcome


def utc_now() -> datetime:
    """The wall clock as an aware UTC datetime (attempt stamps, deadlines)."""
    return datetime.now(UTC)

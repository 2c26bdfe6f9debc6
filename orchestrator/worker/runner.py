"""The worker process's loop: claim due jobs, run them with bounded concurrency, drain on stop.

``Worker.run(stop)`` owns, under one ``asyncio.TaskGroup``:

* the **claim loop** — claims up to ``max_jobs - in flight`` due jobs (the store gives at
  most one per app and leases them), starts a :class:`~orchestrator.worker.rollback.JobRun`
  task per job, and sleeps in ``store.wait_for_work`` (in-process event on SQLite,
  LISTEN/NOTIFY on PostgreSQL, due times of scheduled retries) when there is nothing to do.
  While there is a backlog (the last claim got all it asked for) it refills in batches of
  a quarter of ``max_jobs`` rather than one claim per finished job: one store round trip
  then serves many jobs, and the jobs still in flight keep the call slots busy meanwhile;
* **call slots** — ``concurrency`` bounds the SAE calls in flight, not the jobs: a job
  holds a slot only while its call is on the wire, so jobs writing to the store, waiting
  for the budget or sleeping between verification polls leave the slots to others.
  ``max_jobs`` (default ``2 × concurrency``) bounds the leased jobs;
* **side tasks** — lease renewal of every job in flight (every ``lease_s / 3``), lease
  rescue (jobs of dead workers come back, marked for reconcile; the store fails a job
  whose runs were interrupted ``max_attempts`` times — its ``interrupted_count``, not its
  claims, which also grow with every ordinary retry),
  the ``jobs`` / ``oldest_queued_age`` gauges, and pruning of finished jobs older than the
  retention. An unexpected exception in any of them stops the worker and
  makes ``run`` raise :class:`WorkerCrashed` (the CLI exits 1, loudly); a store outage is
  logged and retried instead, since it is not a bug and the store may come back.

Stopping (``stop`` set, SIGTERM): no more claims; runs stop at their next safe point and
release their jobs (due again at once, for this or another worker); SAE calls already in
flight finish and are recorded; after ``drain_grace_s`` what is left is cancelled and
released (marked for reconcile if a call was on the wire). If the process is killed instead,
leases expire and another worker's rescue puts the jobs back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from orchestrator.errors import LeaseLost, RollbackError, StoreError
from orchestrator.jobs import Claimed, JobStatus
from orchestrator.logging import get_logger
from orchestrator.metrics import Metrics
from orchestrator.ops import refresh_job_gauges
from orchestrator.store.base import Store
from orchestrator.worker.breaker import BreakerState, CircuitBreaker
from orchestrator.worker.budget import CallBudget, make_budget
from orchestrator.worker.retry import RetryPolicy
from orchestrator.worker.rollback import FlowDeps, JobRun, RunResult, SaeApi

__all__ = ["Worker", "WorkerConfig", "WorkerCrashed"]

log = get_logger("orchestrator.worker")

#: Back-off of the claim loop after the store failed (grows to the maximum).
_STORE_BACKOFF_S: Final = (0.1, 5.0)
#: Part of the drain grace kept for cancelling and releasing what did not finish.
_DRAIN_MARGIN_MAX_S: Final = 2.0
#: How often the store's housekeeping (planner statistics) runs.
MAINTAIN_INTERVAL_S: Final = 60.0
#: The breaker's longest open period, as a multiple of ``breaker_open_s``.
BREAKER_MAX_FACTOR: Final = 12.0


class WorkerCrashed(RollbackError):
    """A supervised side task of the worker failed unexpectedly; the worker stopped."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The worker's settings, as plain values (the composition root reads the config)."""

    owner: str
    #: SAE calls in flight at once (a job holds a slot only during its calls).
    concurrency: int = 16
    #: Jobs leased and in progress at once; default ``2 * concurrency`` (enough that jobs
    #: busy writing to the store or sleeping do not leave call slots idle).
    max_jobs: int | None = None
    lease_s: float = 30.0
    max_attempts: int = 10
    drain_grace_s: float = 20.0
    retry_initial_s: float = 1.0
    retry_max_interval_s: float = 30.0
    retry_max_elapsed_s: float = 1800.0
    verify_enabled: bool = True
    verify_poll_interval_s: float = 5.0
    verify_timeout_s: float = 1800.0
    #: Account-wide SAE calls per minute; 0 = no budget.
    calls_per_minute: float = 60.0
    #: Finished jobs older than this are pruned.
    retention_s: float = 30 * 86400.0
    #: How often expired leases are rescued (default ``lease_s / 2``).
    rescue_interval_s: float | None = None
    #: How often the job gauges are refreshed.
    gauge_interval_s: float = 5.0
    #: How often finished jobs are pruned.
    prune_interval_s: float = 3600.0
    #: Longest idle sleep before claiming again anyway (wake-ups usually come sooner).
    idle_poll_s: float = 5.0
    #: Failing SAE calls in a row (5xx, no answer) that open the circuit breaker; 0 = off.
    breaker_failures: int = 5
    #: How long the breaker stays open before one probe call (doubling, up to 12 times this).
    breaker_open_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.owner:
            raise ValueError("owner must not be empty")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {self.max_jobs}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in (
            "lease_s",
            "drain_grace_s",
            "retry_initial_s",
            "retry_max_interval_s",
            "retry_max_elapsed_s",
            "verify_poll_interval_s",
            "verify_timeout_s",
            "retention_s",
            "gauge_interval_s",
            "prune_interval_s",
            "idle_poll_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.rescue_interval_s is not None and not self.rescue_interval_s > 0:
            raise ValueError(f"rescue_interval_s must be > 0, got {self.rescue_interval_s}")
        if self.calls_per_minute < 0:
            raise ValueError("calls_per_minute must be >= 0 (0 = no budget)")
        if self.breaker_failures < 0 or not self.breaker_open_s > 0:
            raise ValueError("need breaker_failures >= 0 (0 = off) and breaker_open_s > 0")

    @property
    def job_limit(self) -> int:
        """Jobs this worker leases at once (``max_jobs``, default ``2 * concurrency``)."""
        return self.max_jobs if self.max_jobs is not None else 2 * self.concurrency

    @property
    def heartbeat_interval_s(self) -> float:
        """Leases are renewed three times per lease period."""
        return self.lease_s / 3.0

    @property
    def effective_rescue_interval_s(self) -> float:
        """How often expired leases are looked for."""
        return self.rescue_interval_s if self.rescue_interval_s is not None else self.lease_s / 2


@dataclass(slots=True, eq=False)
class _InFlight:
    run: JobRun
    task: asyncio.Task[RunResult] = field(repr=False)


class Worker:
    """Claims and runs rollback jobs from ``store`` until told to stop (see module docstring)."""

    def __init__(
        self,
        store: Store,
        client: SaeApi,
        metrics: Metrics,
        config: WorkerConfig,
        *,
        policy: RetryPolicy | None = None,
        budget: CallBudget | None = None,
        wall_clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.client = client
        self.metrics = metrics
        self.config = config
        self.policy = policy or RetryPolicy(
            initial_s=config.retry_initial_s,
            max_interval_s=config.retry_max_interval_s,
            max_elapsed_s=config.retry_max_elapsed_s,
            calls_per_minute=config.calls_per_minute,
        )
        self.budget = budget if budget is not None else make_budget(store, config.calls_per_minute)
        self.breaker = CircuitBreaker(
            threshold=config.breaker_failures,
            open_s=config.breaker_open_s,
            max_open_s=config.breaker_open_s * BREAKER_MAX_FACTOR,
            clock=monotonic,
            on_change=lambda state: metrics.circuit_open.set(state is not BreakerState.CLOSED),
        )
        self._wall_clock = wall_clock or _utc_now
        self._monotonic = monotonic
        self._jobs: dict[str, _InFlight] = {}
        self._draining = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._call_slots = asyncio.Semaphore(config.concurrency)
        self._waiting_jobs = 0
        self._running = False
        #: Count of runs by how they ended (for tests and the benchmark).
        self.results: dict[RunResult, int] = dict.fromkeys(RunResult, 0)

    def __repr__(self) -> str:
        return f"Worker(owner={self.config.owner!r}, in_flight={len(self._jobs)})"

    @property
    def in_flight(self) -> int:
        """Jobs this worker is running right now."""
        return len(self._jobs)

    # -- the whole life ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain and return (see the module docstring)."""
        if self._running:
            raise RuntimeError("this Worker is already running")
        self._running = True
        cfg = self.config
        self.metrics.api_budget_per_minute.set(cfg.calls_per_minute)
        log.info(
            "worker_started",
            owner=cfg.owner,
            engine=self.store.engine,
            concurrency=cfg.concurrency,
            max_jobs=cfg.job_limit,
            lease_s=cfg.lease_s,
            calls_per_minute=cfg.calls_per_minute,
        )
        side_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as group:
                side: dict[str, Callable[[asyncio.Event], Awaitable[None]]] = {
                    "heartbeat": self._heartbeat_loop,
                    "lease_rescue": self._rescue_loop,
                    "gauges": self._gauge_loop,
                    "prune": self._prune_loop,
                    "store_maintenance": self._maintain_loop,
                }
                for name, loop in side.items():
                    group.create_task(self._supervised(name, loop, side_stop), name=name)
                group.create_task(self._main(stop, side_stop), name="claim_loop")
        except BaseExceptionGroup as group_error:
            failure = group_error.exceptions[0]
            raise WorkerCrashed(f"worker task failed: {failure!r}") from failure
        finally:
            self._running = False
        log.info(
            "worker_stopped",
            owner=cfg.owner,
            results={str(k): v for k, v in self.results.items() if v},
        )

    async def _main(self, stop: asyncio.Event, side_stop: asyncio.Event) -> None:
        try:
            await self._claim_loop(stop)
            await self._drain()
        except asyncio.CancelledError:
            # A side task died (or run() was cancelled): release what is in flight quickly.
            await asyncio.shield(self._cancel_jobs(_DRAIN_MARGIN_MAX_S))
            raise
        finally:
            side_stop.set()

    async def _supervised(
        self, name: str, loop: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        try:
            await loop(stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker_task_died", task=name)
            raise

    # -- claiming ----------------------------------------------------------------------------------

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        cfg = self.config
        limit = cfg.job_limit
        refill = max(1, limit // 4)
        backoff = _STORE_BACKOFF_S[0]
        idle_rounds = 0
        backlog = False
        while not stop.is_set():
            free = limit - len(self._jobs)
            # With a backlog, wait for a batch of free places: one claim then serves many
            # jobs (the jobs still in flight keep the call slots busy meanwhile). Without
            # one, claim as soon as anything is free (a new job must not wait for a batch).
            if free <= 0 or (backlog and free < refill):
                self._slot_freed.clear()
                free = limit - len(self._jobs)
                if free <= 0 or (backlog and free < refill):
                    await _first_of(self._slot_freed.wait(), stop.wait())
                continue
            try:
                claimed = await self._claim(free)
            except StoreError as exc:
                log.warning("claim_failed", error=str(exc), retry_in_s=backoff)
                await _first_of(asyncio.sleep(backoff), stop.wait())
                backoff = min(backoff * 2, _STORE_BACKOFF_S[1])
                continue
            backoff = _STORE_BACKOFF_S[0]
            for item in claimed:
                self._start(item)
            backlog = len(claimed) >= free
            if backlog:
                continue  # maybe more is due: claim again once a batch of places is free
            started = self._monotonic()
            try:
                await _first_of(self.store.wait_for_work(cfg.idle_poll_s), stop.wait())
            except StoreError as exc:
                log.warning("wait_for_work_failed", error=str(exc))
                await _first_of(asyncio.sleep(backoff), stop.wait())
            # Guard against a busy loop if the store keeps saying "due" but has nothing
            # claimable for us (e.g. every due job belongs to an app another worker holds).
            if not claimed and self._monotonic() - started < 0.001:
                idle_rounds += 1
                if idle_rounds > 3:
                    await _first_of(asyncio.sleep(0.05), stop.wait())
            else:
                idle_rounds = 0

    async def _claim(self, limit: int) -> list[Claimed]:
        """``store.claim``, made safe against cancellation of the claim loop.

        A claim cancelled mid-way may still commit (the write is already on its way), and
        its jobs would then sit leased by nobody until the lease expires. So the claim runs
        shielded, and if the loop is cancelled meanwhile, whatever it got is released.
        """
        cfg = self.config
        claim = asyncio.ensure_future(self.store.claim(cfg.owner, cfg.lease_s, limit))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                late = await asyncio.wait_for(claim, _DRAIN_MARGIN_MAX_S)
                for item in late:
                    await self.store.release(item.job.id, item.token)
            raise

    def _start(self, claimed: Claimed) -> None:
        run = JobRun(self._deps(), claimed)
        task = asyncio.create_task(run.run(), name=f"job:{claimed.job.id}")
        entry = _InFlight(run, task)
        self._jobs[claimed.job.id] = entry
        task.add_done_callback(functools.partial(self._finished, claimed.job.id))

    def _finished(self, job_id: str, task: asyncio.Task[RunResult]) -> None:
        entry = self._jobs.get(job_id)
        if entry is not None and entry.task is task:
            del self._jobs[job_id]
        if not task.cancelled() and task.exception() is None:
            self.results[task.result()] += 1
        self._slot_freed.set()

    def _deps(self) -> FlowDeps:
        cfg = self.config
        return FlowDeps(
            store=self.store,
            client=self.client,
            budget=self.budget,
            metrics=self.metrics,
            policy=self.policy,
            owner=cfg.owner,
            lease_s=cfg.lease_s,
            max_attempts=cfg.max_attempts,
            verify_enabled=cfg.verify_enabled,
            verify_poll_interval_s=cfg.verify_poll_interval_s,
            verify_timeout_s=cfg.verify_timeout_s,
            draining=self._draining,
            waiting_jobs=lambda: self._waiting_jobs,
            wall_clock=self._wall_clock,
            monotonic=self._monotonic,
            call_slots=self._call_slots,
            breaker=self.breaker,
        )

    # -- stopping ----------------------------------------------------------------------------------

    async def _drain(self) -> None:
        cfg = self.config
        tasks = [entry.task for entry in self._jobs.values()]
        log.info("worker_draining", in_flight=len(tasks), grace_s=cfg.drain_grace_s)
        self._draining.set()
        if not tasks:
            return
        margin = min(_DRAIN_MARGIN_MAX_S, cfg.drain_grace_s / 4.0)
        _done, pending = await asyncio.wait(tasks, timeout=cfg.drain_grace_s - margin)
        if pending:
            log.warning("worker_drain_timeout", unfinished=len(pending))
            await self._cancel_jobs(margin)

    async def _cancel_jobs(self, timeout_s: float) -> None:
        """Cancel every run; each releases its job as it unwinds (waited for, bounded)."""
        self._draining.set()
        entries = [entry for entry in self._jobs.values() if not entry.task.done()]
        for entry in entries:
            entry.task.cancel()
        if not entries:
            return
        await asyncio.wait([e.task for e in entries], timeout=max(0.1, timeout_s))
        # A task cancelled before its first step never ran its own release: do it here, so
        # the job is due again at once instead of after its lease expires.
        for entry in entries:
            if not entry.run.started:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.store.release(entry.run.job.id, entry.run.token), timeout_s
                    )

    # -- side tasks --------------------------------------------------------------------------------

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        cfg = self.config
        while not await _stopped(stop, cfg.heartbeat_interval_s):
            entries = [e for e in self._jobs.values() if not e.task.done() and not e.run.settling]
            if not entries:
                continue
            results = await asyncio.gather(
                *(self.store.heartbeat(e.run.job.id, e.run.token, cfg.lease_s) for e in entries),
                return_exceptions=True,
            )
            for entry, result in zip(entries, results, strict=True):
                if isinstance(result, LeaseLost):
                    if entry.run.settling or entry.task.done():
                        continue  # the run just ended its lease itself
                    entry.run.lease_lost = True
                    log.warning("lease_lost", job_id=entry.run.job.id, error=str(result))
                    entry.task.cancel()
                elif isinstance(result, StoreError):
                    log.warning("heartbeat_failed", job_id=entry.run.job.id, error=str(result))
                elif isinstance(result, BaseException):
                    raise result

    async def _rescue_loop(self, stop: asyncio.Event) -> None:
        cfg = self.config
        while not await _stopped(stop, cfg.effective_rescue_interval_s):
            try:
                rescued = await self.store.rescue_expired(cfg.max_attempts)
            except StoreError as exc:
                log.warning("lease_rescue_failed", error=str(exc))
                continue
            if rescued:
                log.warning("leases_rescued", count=rescued)

    async def _gauge_loop(self, stop: asyncio.Event) -> None:
        cfg = self.config
        interval = 0.0  # refresh once at start, then every gauge_interval_s
        while not await _stopped(stop, interval):
            interval = cfg.gauge_interval_s
            try:
                stats = await refresh_job_gauges(self.store, self.metrics)
            except StoreError as exc:
                log.warning("gauges_failed", error=str(exc))
                continue
            self._waiting_jobs = stats.counts.get(JobStatus.WAITING, 0)

    async def _maintain_loop(self, stop: asyncio.Event) -> None:
        # Soon after start (a restart with a backlog is when a stale plan hurts most),
        # then every minute; the check itself is one catalog read.
        interval = 1.0
        while not await _stopped(stop, interval):
            interval = MAINTAIN_INTERVAL_S
            try:
                if await self.store.maintain():
                    log.debug("store_maintained")
            except StoreError as exc:
                log.warning("store_maintenance_failed", error=str(exc))

    async def _prune_loop(self, stop: asyncio.Event) -> None:
        cfg = self.config
        interval = min(60.0, cfg.prune_interval_s)  # first prune soon after start
        while not await _stopped(stop, interval):
            interval = cfg.prune_interval_s
            cutoff = self._wall_clock() - timedelta(seconds=cfg.retention_s)
            try:
                pruned = await self.store.prune(cutoff)
            except StoreError as exc:
                log.warning("prune_failed", error=str(exc))
                continue
            if pruned:
                log.info("jobs_pruned", count=pruned, finished_before=cutoff.isoformat())


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; return whether it is set."""
    if not stop.is_set() and seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _first_of(*awaitables: Awaitable[object]) -> None:
    """Wait until the first of ``awaitables`` completes; cancel the rest; re-raise its error."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


def _utc_now() -> datetime:
    return datetime.now(UTC)

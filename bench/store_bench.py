"""Store benchmark: our store (SQLite, PostgreSQL) against pgqueuer and procrastinate.

Owns the measurement of issue 3's queue figures, all on one machine and one PostgreSQL:

1. **enqueue** — jobs/s of sequential single-job enqueue calls, each committed;
2. **claim+finish** — jobs/s of one worker process draining a backlog of N no-op jobs at
   concurrency 1 and 50 (jobs in flight in one asyncio process);
3. **pickup** — idle pickup latency: the worker waits idle, one job is enqueued, and we
   time enqueue-commit → the job is claimed (median and p99 of ``--pickup-samples``).

What each engine does for one no-op job (the exact work measured):

* ``sqlite`` / ``postgres`` (ours): ``enqueue(NewJob)`` (job row + ``accepted`` audit row);
  a worker loop that claims jobs (``claim(owner, lease_s, limit)``: status running, lease
  token, attempt count + 1, ``claimed`` audit row), then records the successful SAE call
  (attempt row) and moves the job to ``succeeded`` (``finished`` audit row) — the
  bookkeeping a real worker does for a job whose SAE call succeeded at once. By default
  that is one write, ``transition(..., succeeded, attempt=...)``; ``--finish two-writes``
  makes it ``record_attempt(...)`` then ``transition(...)``. At concurrency 1 it loops
  claim(limit=1) → finish; at concurrency C a claimer keeps C jobs in flight, claiming up
  to min(free slots, ``--claim-batch``) per call and waking on ``wait_for_work``.
* ``pgqueuer``: its real consumer loop ``QueueManager.run`` (``PgQueuer`` over one asyncpg
  connection, the default ``batch_size=10``; concurrency 1 = ``entrypoint(...,
  concurrency_limit=1)``, concurrency C = ``max_concurrent_tasks=C``); enqueue is
  ``Queries.enqueue`` on a second connection.
* ``procrastinate``: its real worker ``App.run_worker_async(concurrency=C)`` over the
  ``PsycopgConnector`` (psycopg 3 pool, library defaults); enqueue is ``Task.defer_async``.

Every engine runs in its own child process (fresh interpreter, own peak RSS) and gets its
own database (``bench_<engine>``) in the PostgreSQL at ``--pg-dsn``, dropped afterwards;
SQLite uses a file in a temporary directory with the store's own settings (WAL,
``synchronous=FULL``).

Run: ``.venv/bin/python bench/store_bench.py [--jobs 5000] [--only sqlite,postgres,...]
[--json out.json]``. Results and analysis live in ``bench/README.md`` ("Store").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    # Run as a script, sys.path[0] is bench/; the repository root makes `bench.common` and
    # `orchestrator` import the same way as under pytest or `python -m bench.store_bench`.
    sys.path.insert(0, str(_ROOT))

from bench.common import (  # noqa: E402
    LatencySummary,
    format_table,
    git_revision,
    machine_info,
    peak_rss_mb,
    timed,
    with_database,
    write_json,
)

ENGINES = ("sqlite", "postgres", "pgqueuer", "procrastinate")
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_DSN_ENV = "SAE_ROLLBACK_BENCH_PG_DSN"
# Goals from the brief: ours on PostgreSQL vs pgqueuer, ours on SQLite in absolute terms.
SQLITE_GOAL_PER_S = 2000.0
MAX_CLAIM = 1000  # orchestrator.store.base.MAX_CLAIM_LIMIT
# How ours records a job's one successful SAE call: with the transition (one write) or
# as record_attempt() then transition() (two writes).
FINISH_MODES = ("one-write", "two-writes")

log = logging.getLogger("store_bench")


# --------------------------------------------------------------------------- results


@dataclass
class Phase:
    """One timed phase: how many jobs, wall seconds, rate, and this process's CPU share."""

    jobs: int
    wall_s: float
    per_s: float
    cpu_share: float


@dataclass
class EngineResult:
    """Everything measured for one engine in one child process."""

    engine: str
    jobs: int
    enqueue: Phase
    drain: dict[str, Phase]  # keyed by concurrency, as a string for JSON
    pickup: LatencySummary
    pickup_from_call: LatencySummary  # from the start of the enqueue call, not its commit
    peak_rss_mb: float
    setup_s: float
    details: dict[str, Any] = field(default_factory=dict)
    #: The raw pickup samples (ms, from commit / from call), so repeats can be pooled.
    pickup_ms: list[float] = field(default_factory=list)
    pickup_from_call_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineResult:
        """Rebuild a result from the JSON a child process wrote."""
        return cls(
            engine=raw["engine"],
            jobs=raw["jobs"],
            enqueue=Phase(**raw["enqueue"]),
            drain={k: Phase(**v) for k, v in raw["drain"].items()},
            pickup=LatencySummary(**raw["pickup"]),
            pickup_from_call=LatencySummary(**raw["pickup_from_call"]),
            peak_rss_mb=raw["peak_rss_mb"],
            setup_s=raw["setup_s"],
            details=raw.get("details", {}),
            pickup_ms=raw.get("pickup_ms", []),
            pickup_from_call_ms=raw.get("pickup_from_call_ms", []),
        )


def _median_phase(phases: Sequence[Phase]) -> Phase:
    return Phase(
        jobs=phases[0].jobs,
        wall_s=round(statistics.median(p.wall_s for p in phases), 4),
        per_s=round(statistics.median(p.per_s for p in phases), 1),
        cpu_share=round(statistics.median(p.cpu_share for p in phases), 3),
    )


def combine_runs(runs: Sequence[EngineResult]) -> EngineResult:
    """One engine's repeated runs as one result: median rates, pooled pickup samples.

    The median resists the occasional run that a neighbour's burst of load slowed down;
    the spread (min/max per rate) and every run's rates stay in ``details["runs"]``.
    """
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    pooled = [ms for r in runs for ms in r.pickup_ms]
    pooled_call = [ms for r in runs for ms in r.pickup_from_call_ms]
    per_run = [
        {
            "enqueue": r.enqueue.per_s,
            **{f"c={c}": p.per_s for c, p in r.drain.items()},
            "pickup_p50_ms": round(r.pickup.median_ms, 3),
            "load_avg_1m": r.details.get("load_avg_1m"),
        }
        for r in runs
    ]
    loads = [r.details["load_avg_1m"] for r in runs if r.details.get("load_avg_1m")]
    details = {**first.details, "repeats": len(runs), "runs": per_run}
    if loads:  # the lowest load any run started with, the highest any ended with
        details["load_avg_1m"] = [min(x[0] for x in loads), max(x[1] for x in loads)]
    return EngineResult(
        engine=first.engine,
        jobs=first.jobs,
        enqueue=_median_phase([r.enqueue for r in runs]),
        drain={c: _median_phase([r.drain[c] for r in runs]) for c in first.drain},
        pickup=LatencySummary.from_seconds([ms / 1000.0 for ms in pooled]),
        pickup_from_call=LatencySummary.from_seconds([ms / 1000.0 for ms in pooled_call]),
        peak_rss_mb=max(r.peak_rss_mb for r in runs),
        setup_s=round(statistics.median(r.setup_s for r in runs), 3),
        details=details,
        pickup_ms=pooled,
        pickup_from_call_ms=pooled_call,
    )


# --------------------------------------------------------------------------- engine adapters


class Engine(Protocol):
    """What the harness needs from each queue under test."""

    name: str
    details: dict[str, Any]

    async def setup(self) -> None:
        """Create a fresh database/schema/file and open connections."""

    async def enqueue_one(self, i: int) -> None:
        """Enqueue no-op job number ``i``; committed when it returns."""

    async def fill(self, start: int, n: int) -> None:
        """Enqueue ``n`` more jobs as fast as the engine allows (not timed)."""

    async def analyze(self) -> None:
        """Refresh the planner statistics of the engine's tables (``ANALYZE``)."""

    async def drain(self, n: int, concurrency: int) -> int:
        """Run the engine's worker until the ``n`` queued jobs are finished; return how many ran."""

    def pickup(self, samples: int, gap_s: float) -> AsyncIterator[tuple[float, float]]:
        """Yield ``(from_commit_s, from_call_s)`` per job enqueued into an idle worker."""

    async def teardown(self) -> None:
        """Close everything and drop what setup created."""


async def _recreate_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _analyze_database(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


_PG_COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")


async def _pg_counters(admin_dsn: str, name: str) -> dict[str, int]:
    """Transaction and row counters PostgreSQL kept for database ``name`` since it was created.

    Backends publish their counters when they exit, so the caller closes its connections
    first; we poll until two reads agree (the exits are asynchronous to our close).
    """
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        previous: dict[str, int] | None = None
        for _ in range(20):
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            row = await conn.fetchrow(
                f"SELECT {', '.join(_PG_COUNTERS)} FROM pg_stat_database WHERE datname = $1",
                name,
            )
            current = {k: int(row[k]) for k in _PG_COUNTERS} if row else {}
            if current == previous:
                return current
            previous = current
            await asyncio.sleep(0.25)
        return previous or {}
    finally:
        await conn.close()


class _Waiter:
    """Hands the moment a job started running from the worker to the pickup loop."""

    def __init__(self) -> None:
        self.future: asyncio.Future[float] | None = None

    def arm(self) -> asyncio.Future[float]:
        self.future = asyncio.get_running_loop().create_future()
        return self.future

    def hit(self) -> None:
        now = time.perf_counter()
        if self.future is not None and not self.future.done():
            self.future.set_result(now)


async def _pickup_loop(
    enqueue: Callable[[int], Any],
    waiter: _Waiter,
    samples: int,
    gap_s: float,
    first_index: int,
) -> AsyncIterator[tuple[float, float]]:
    """Enqueue one job at a time into an idle worker and time how soon it starts."""
    for k in range(samples):
        # Let the worker finish its bookkeeping and go back to waiting, so each sample
        # measures a truly idle worker and not one still polling after the last job.
        await asyncio.sleep(gap_s)
        started = waiter.arm()
        t_call = time.perf_counter()
        await enqueue(first_index + k)
        t_commit = time.perf_counter()
        t_run = await asyncio.wait_for(started, timeout=30)
        yield t_run - t_commit, t_run - t_call


class PgQueuerEngine:
    """pgqueuer 1.6 through its own QueueManager loop over asyncpg."""

    name = "pgqueuer"
    entrypoint = "noop"

    def __init__(
        self, admin_dsn: str, batch_size: int, job_s: float = 0.0, dbname: str = "bench_pgqueuer"
    ) -> None:
        self.admin_dsn = admin_dsn
        self.dbname = dbname
        self.dsn = with_database(admin_dsn, self.dbname)
        self.batch_size = batch_size
        # The job body: a no-op, or an asyncio sleep standing for an I/O call (worker_bench).
        self.job_s = job_s
        self.details: dict[str, Any] = {}
        self._producer: Any = None  # asyncpg.Connection used for enqueue
        self._queries: Any = None
        self._counter = 0
        self._waiter = _Waiter()

    async def setup(self) -> None:
        from importlib.metadata import version

        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        await _recreate_database(self.admin_dsn, self.dbname)
        self._producer = await asyncpg.connect(self.dsn)
        self._queries = Queries(AsyncpgDriver(self._producer))
        await self._queries.install()
        self.details.update(
            version=version("pgqueuer"),
            driver="asyncpg (one connection for the consumer, one for enqueue)",
            batch_size=self.batch_size,
            concurrency_1="entrypoint(concurrency_limit=1), batch_size=1",
            concurrency_c="max_concurrent_tasks=C",
            durability="durable (all tables LOGGED, the default)",
        )

    async def enqueue_one(self, i: int) -> None:
        await self._queries.enqueue(self.entrypoint, None)

    async def fill(self, start: int, n: int) -> None:
        # The batch form of enqueue (one statement) only builds the backlog; not timed.
        await self._queries.enqueue([self.entrypoint] * n, [None] * n, [0] * n)

    async def analyze(self) -> None:
        await _analyze_database(self.dsn)

    def _make_consumer(self, conn: Any, concurrency: int) -> Any:
        from pgqueuer import AsyncpgDriver, PgQueuer

        pgq = PgQueuer(AsyncpgDriver(conn))

        async def noop(job: Any) -> None:
            if self.job_s:
                await asyncio.sleep(self.job_s)
            self._counter += 1
            self._waiter.hit()

        pgq.entrypoint(self.entrypoint, concurrency_limit=1 if concurrency == 1 else 0)(noop)
        return pgq

    def _run_kwargs(self, concurrency: int) -> dict[str, Any]:
        if concurrency == 1:
            # One job at a time: a batch of 1 also makes pgqueuer flush each job's final
            # status at once (its log buffer flushes at batch_size items or every 0.1 s),
            # which frees the concurrency slot; with the default 10 it idles ~0.1 s per job.
            return {"batch_size": 1}
        # pgqueuer refuses a cap below twice the batch size; keep its batch size default
        # and only lower it when the requested concurrency is too small for it.
        batch = min(self.batch_size, max(1, concurrency // 2))
        return {"batch_size": batch, "max_concurrent_tasks": concurrency}

    async def drain(self, n: int, concurrency: int) -> int:
        import asyncpg
        from pgqueuer.types import QueueExecutionMode

        conn = await asyncpg.connect(self.dsn)
        try:
            self._counter = 0
            pgq = self._make_consumer(conn, concurrency)
            # drain mode: returns once the queue is empty and every job's final status
            # (the DELETE + log row, buffered by pgqueuer) is flushed.
            await pgq.run(mode=QueueExecutionMode.drain, **self._run_kwargs(concurrency))
            return self._counter
        finally:
            await conn.close()

    async def pickup(self, samples: int, gap_s: float) -> AsyncIterator[tuple[float, float]]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        pgq = self._make_consumer(conn, 50)
        task = asyncio.create_task(pgq.run(**self._run_kwargs(50)))
        try:
            async for sample in _pickup_loop(self.enqueue_one, self._waiter, samples, gap_s, 0):
                yield sample
        finally:
            pgq.shutdown.set()
            await asyncio.wait_for(task, timeout=30)
            await conn.close()

    async def teardown(self) -> None:
        try:
            if self._producer is not None:
                await self._producer.close()
            self.details["pg_counters"] = await _pg_counters(self.admin_dsn, self.dbname)
        finally:
            await _drop_database(self.admin_dsn, self.dbname)


class ProcrastinateEngine:
    """procrastinate 3.10 through its own worker over the psycopg 3 connector."""

    name = "procrastinate"

    def __init__(
        self, admin_dsn: str, job_s: float = 0.0, dbname: str = "bench_procrastinate"
    ) -> None:
        self.admin_dsn = admin_dsn
        self.dbname = dbname
        self.dsn = with_database(admin_dsn, self.dbname)
        self.job_s = job_s
        self.details: dict[str, Any] = {}
        self._app: Any = None
        self._task: Any = None
        self._counter = 0
        self._waiter = _Waiter()

    async def setup(self) -> None:
        from importlib.metadata import version

        import procrastinate

        await _recreate_database(self.admin_dsn, self.dbname)
        connector = procrastinate.PsycopgConnector(conninfo=self.dsn)
        app = procrastinate.App(connector=connector)

        @app.task(name="noop")
        async def noop() -> None:
            if self.job_s:
                await asyncio.sleep(self.job_s)
            self._counter += 1
            self._waiter.hit()

        self._task = noop
        await app.open_async()
        self._app = app
        await app.schema_manager.apply_schema_async()
        pool = connector.pool
        self.details.update(
            version=version("procrastinate"),
            driver="PsycopgConnector (psycopg_pool.AsyncConnectionPool, library defaults)",
            pool_min_size=pool.min_size,
            pool_max_size=pool.max_size,
            worker="App.run_worker_async(concurrency=C, listen_notify=True, delete_jobs=never)",
        )

    async def enqueue_one(self, i: int) -> None:
        await self._task.defer_async()

    async def fill(self, start: int, n: int) -> None:
        await self._task.batch_defer_async(*({} for _ in range(n)))

    async def analyze(self) -> None:
        await _analyze_database(self.dsn)

    async def drain(self, n: int, concurrency: int) -> int:
        self._counter = 0
        # wait=False: the worker stops once it finds the queue empty and has finished
        # (and recorded) every job it started.
        await self._app.run_worker_async(
            concurrency=concurrency, wait=False, install_signal_handlers=False
        )
        return self._counter

    async def pickup(self, samples: int, gap_s: float) -> AsyncIterator[tuple[float, float]]:
        worker = asyncio.create_task(
            self._app.run_worker_async(concurrency=50, install_signal_handlers=False)
        )
        try:
            async for sample in _pickup_loop(self.enqueue_one, self._waiter, samples, gap_s, 0):
                yield sample
        finally:
            # Cancelling run_worker_async is procrastinate's documented graceful stop.
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def teardown(self) -> None:
        try:
            if self._app is not None:
                await self._app.close_async()
            self.details["pg_counters"] = await _pg_counters(self.admin_dsn, self.dbname)
        finally:
            await _drop_database(self.admin_dsn, self.dbname)


class _OpTimer:
    """Accumulates the client-side wall time of each store call (mean ms per call)."""

    def __init__(self) -> None:
        self.total_s: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def time(self, op: str) -> Any:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.total_s[op] = self.total_s.get(op, 0.0) + time.perf_counter() - t0
            self.calls[op] = self.calls.get(op, 0) + 1

    def mean_ms(self) -> dict[str, float]:
        return {op: round(1000.0 * t / self.calls[op], 3) for op, t in self.total_s.items()}

    def reset(self) -> None:
        self.total_s.clear()
        self.calls.clear()


class OurStoreEngine:
    """Our ``Store`` (``orchestrator.store``) on SQLite or PostgreSQL, driven like a worker."""

    lease_s = 60.0

    def __init__(
        self, engine: str, admin_dsn: str, claim_batch: int, finish: str = "one-write"
    ) -> None:
        if engine not in ("sqlite", "postgres"):
            raise ValueError(engine)
        if finish not in FINISH_MODES:
            raise ValueError(f"finish must be one of {FINISH_MODES}, got {finish!r}")
        self.name = engine
        self.finish = finish
        self.admin_dsn = admin_dsn
        self.dbname = "bench_ours"
        self.claim_batch = claim_batch
        self.details: dict[str, Any] = {}
        self.owner = f"store-bench-{os.getpid()}"
        self._run = uuid.uuid4().hex[:8]  # keeps change order ids unique across runs
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._url = ""
        self._worker_store: Any = None
        self._producer_store: Any = None
        self._total_done = 0
        self._ops = _OpTimer()
        self._on_claim: Callable[[], None] | None = None

    async def setup(self) -> None:
        from orchestrator.store import open_store

        if self.name == "sqlite":
            self._tmp = tempfile.TemporaryDirectory(prefix="store_bench_sqlite_")
            url = f"sqlite:///{Path(self._tmp.name) / 'bench.db'}"
        else:
            await _recreate_database(self.admin_dsn, self.dbname)
            url = with_database(self.admin_dsn, self.dbname)
        self._url = url
        self._worker_store = open_store(url)
        await self._worker_store.open(migrate=True)
        if self.name == "sqlite":
            # One process serves intake and worker on SQLite (design.md "Engines and
            # scale"), so they share one Store and its in-process wake-up event.
            self._producer_store = self._worker_store
        else:
            # On PostgreSQL intake and workers are separate processes: a second Store
            # (own pool) makes the wake-up go through LISTEN/NOTIFY like in production.
            self._producer_store = open_store(url)
            await self._producer_store.open()
        self.details.update(
            url=url if self.name == "sqlite" else f"postgresql://.../{self.dbname}",
            claim_batch=self.claim_batch,
            lease_s=self.lease_s,
            finish=self.finish,
            per_job=(
                "enqueue(NewJob) | claim (running, attempt+1, audit 'claimed') -> "
                + (
                    "transition(succeeded, attempt=...) (attempt row + audit 'finished', one write)"
                    if self.finish == "one-write"
                    else "record_attempt(success) -> transition(succeeded, audit 'finished')"
                )
            ),
        )

    def _new_job(self, i: int) -> Any:
        from orchestrator.jobs import NewJob

        # A distinct app per job: the store claims at most one job per app at a time, so
        # jobs of one app would measure that rule instead of the queue.
        return NewJob(
            region="cn-hangzhou",
            source="bench",
            change_order_id=f"co-{self._run}-{i}",
            app_id=f"app-{self._run}-{i}",
            reason="store benchmark",
            requested_by="store_bench",
        )

    async def enqueue_one(self, i: int) -> None:
        with self._ops.time("enqueue"):
            await self._producer_store.enqueue(self._new_job(i))

    async def fill(self, start: int, n: int) -> None:
        # No batch enqueue in the Store API; a few concurrent callers fill faster on
        # PostgreSQL (pool) and make no difference on SQLite (one writer).
        step = 16
        for lo in range(start, start + n, step):
            hi = min(lo + step, start + n)
            await asyncio.gather(
                *(self._producer_store.enqueue(self._new_job(i)) for i in range(lo, hi))
            )

    async def analyze(self) -> None:
        if self.name == "postgres":
            await _analyze_database(self._url)
            return
        import sqlite3

        def run() -> None:
            conn = sqlite3.connect(self._url.removeprefix("sqlite:///"), timeout=30)
            try:
                conn.execute("ANALYZE")
            finally:
                conn.close()

        await asyncio.to_thread(run)

    async def _finish(self, claimed: Any) -> None:
        """The bookkeeping of a worker whose single SAE call succeeded at once."""
        from datetime import UTC, datetime

        from orchestrator.jobs import AttemptIn, AttemptOutcome, JobStatus

        store = self._worker_store
        job_id, token = claimed.job.id, claimed.token
        attempt = AttemptIn(
            action="AbortAndRollbackChangeOrder",
            started_at=datetime.now(UTC),
            duration_ms=0,
            outcome=AttemptOutcome.SUCCESS,
            http_status=200,
            code=None,
            message=None,
            request_id=str(uuid.uuid4()).upper(),
            trace_id=uuid.uuid4().hex[:30],
        )
        if self.finish == "one-write":
            # What a worker does when the call that decides the job returns: the attempt
            # row and the transition in one transaction.
            with self._ops.time("transition"):
                await store.transition(job_id, token, JobStatus.SUCCEEDED, attempt=attempt)
            return
        with self._ops.time("record_attempt"):
            await store.record_attempt(job_id, token, attempt)
        with self._ops.time("transition"):
            await store.transition(job_id, token, JobStatus.SUCCEEDED)

    async def _claim(self, limit: int) -> list[Any]:
        with self._ops.time("claim"):
            claimed: list[Any] = await self._worker_store.claim(self.owner, self.lease_s, limit)
        if claimed and self._on_claim is not None:
            self._on_claim()
        return claimed

    async def _work(self, concurrency: int, done: Callable[[int], bool]) -> int:
        """A worker loop: keep up to ``concurrency`` jobs in flight until ``done(finished)``.

        At concurrency 1 it is claim(limit=1) -> finish, repeated; above, a claimer fills
        free slots (at most ``claim_batch`` per claim) and, when nothing is due, sleeps in
        ``wait_for_work`` (or until a slot frees) like the real worker's claim loop.
        """
        finished = 0
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while not done(finished):
                free = concurrency - len(in_flight)
                got: list[Any] = []
                if free > 0:
                    got = await self._claim(min(free, self.claim_batch, MAX_CLAIM))
                    if concurrency == 1:
                        for claimed in got:
                            await self._finish(claimed)
                            finished += 1
                        if got:
                            continue
                    else:
                        for claimed in got:
                            in_flight.add(asyncio.create_task(self._finish(claimed)))
                        if len(got) == min(free, self.claim_batch) and len(in_flight) < concurrency:
                            continue  # more may be due right now: fill the other slots
                if in_flight:
                    done_tasks, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done_tasks:
                        task.result()  # a failed finish fails the benchmark loudly
                        finished += 1
                elif not got:
                    await self._worker_store.wait_for_work(1.0)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
        return finished

    async def drain(self, n: int, concurrency: int) -> int:
        from orchestrator.jobs import JobStatus

        self._ops.reset()
        ran = await self._work(concurrency, lambda finished: finished >= n)
        self.details[f"op_mean_ms_c{concurrency}"] = self._ops.mean_ms()
        self._total_done += ran
        stats = await self._worker_store.stats()
        succeeded = stats.counts[JobStatus.SUCCEEDED]
        if succeeded != self._total_done:
            raise RuntimeError(
                f"{succeeded} jobs succeeded in the store, expected {self._total_done}"
            )
        return ran

    async def pickup(self, samples: int, gap_s: float) -> AsyncIterator[tuple[float, float]]:
        waiter = _Waiter()
        stop = asyncio.Event()
        self._on_claim = waiter.hit
        worker = asyncio.create_task(self._idle_worker(stop))
        try:
            async for sample in _pickup_loop(self.enqueue_one, waiter, samples, gap_s, 10**9):
                if worker.done():
                    worker.result()
                yield sample
        finally:
            stop.set()
            await asyncio.wait_for(worker, timeout=30)
            self._on_claim = None

    async def _idle_worker(self, stop: asyncio.Event) -> None:
        """Claim loop for the pickup test: claim, finish, else wait_for_work (or stop)."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                got = await self._claim(self.claim_batch)
                for claimed in got:
                    await self._finish(claimed)
                if got:
                    continue
                waiting = asyncio.create_task(self._worker_store.wait_for_work(5.0))
                await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiting
                else:
                    waiting.result()
        finally:
            stopping.cancel()

    async def teardown(self) -> None:
        try:
            if self._producer_store is not None and self._producer_store is not self._worker_store:
                await self._producer_store.close()
            if self._worker_store is not None:
                await self._worker_store.close()
            if self.name == "postgres":
                self.details["pg_counters"] = await _pg_counters(self.admin_dsn, self.dbname)
        finally:
            if self.name == "postgres":
                await _drop_database(self.admin_dsn, self.dbname)
            if self._tmp is not None:
                self._tmp.cleanup()


# --------------------------------------------------------------------------- harness


def _phase(n: int, wall_s: float, cpu_s: float) -> Phase:
    return Phase(
        jobs=n,
        wall_s=round(wall_s, 4),
        per_s=round(n / wall_s, 1) if wall_s > 0 else 0.0,
        cpu_share=round(cpu_s / wall_s, 3) if wall_s > 0 else 0.0,
    )


async def run_engine(
    engine: Engine,
    jobs: int,
    concurrencies: Sequence[int] = (1, 50),
    pickup_samples: int = 50,
    pickup_gap_s: float = 0.2,
    analyze: bool = False,
) -> EngineResult:
    """Measure one engine: enqueue, drain at each concurrency, idle pickup latency.

    ``analyze`` refreshes the planner statistics once the backlog of each drain is in
    place, as autovacuum would in production (the test server runs with it off).
    """
    # The machine may be shared: keep the load seen by this engine's run with its figures.
    load_before = os.getloadavg()[0]
    try:
        # Inside the try: a setup that fails half-way still drops what it created.
        with timed() as setup:
            await engine.setup()
        log.info("%s: enqueue %d jobs one by one", engine.name, jobs)
        with timed() as enq:
            for i in range(jobs):
                await engine.enqueue_one(i)
        enqueue = _phase(jobs, enq.wall_s, enq.cpu_s)

        drain: dict[str, Phase] = {}
        next_index = jobs
        for k, concurrency in enumerate(concurrencies):
            if k > 0:  # the first drain eats the backlog the enqueue phase left
                await engine.fill(next_index, jobs)
                next_index += jobs
            if analyze:
                await engine.analyze()
            log.info("%s: drain %d jobs at concurrency %d", engine.name, jobs, concurrency)
            with timed() as m:
                ran = await engine.drain(jobs, concurrency)
            if ran != jobs:
                raise RuntimeError(
                    f"{engine.name}: drain at concurrency {concurrency} ran {ran} of {jobs} jobs"
                )
            drain[str(concurrency)] = _phase(jobs, m.wall_s, m.cpu_s)

        log.info("%s: idle pickup latency, %d samples", engine.name, pickup_samples)
        from_commit: list[float] = []
        from_call: list[float] = []
        async for c, s in engine.pickup(pickup_samples, pickup_gap_s):
            from_commit.append(c)
            from_call.append(s)
    finally:
        await engine.teardown()
    engine.details["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    counters = engine.details.get("pg_counters")
    if counters:
        # Every job went through enqueue + claim + finish exactly once (the schema setup
        # is in there too, a constant few transactions).
        lifecycles = jobs * len(concurrencies) + pickup_samples
        engine.details["pg_per_job"] = {
            k: round(v / lifecycles, 2) for k, v in counters.items() if k != "xact_rollback"
        }
    return EngineResult(
        engine=engine.name,
        jobs=jobs,
        enqueue=enqueue,
        drain=drain,
        pickup=LatencySummary.from_seconds(from_commit),
        pickup_from_call=LatencySummary.from_seconds(from_call),
        pickup_ms=[round(x * 1000.0, 4) for x in from_commit],
        pickup_from_call_ms=[round(x * 1000.0, 4) for x in from_call],
        peak_rss_mb=round(peak_rss_mb(), 1),
        setup_s=round(setup.wall_s, 3),
        details=engine.details,
    )


def make_engine(name: str, args: argparse.Namespace) -> Engine:
    """Build the adapter for engine ``name`` from the command-line options."""
    if name in ("sqlite", "postgres"):
        return OurStoreEngine(name, args.pg_dsn, claim_batch=args.claim_batch, finish=args.finish)
    if name == "pgqueuer":
        return PgQueuerEngine(args.pg_dsn, batch_size=args.pgq_batch_size)
    if name == "procrastinate":
        return ProcrastinateEngine(args.pg_dsn)
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


async def _child_main(args: argparse.Namespace) -> EngineResult:
    engine = make_engine(args.child, args)
    return await run_engine(
        engine,
        jobs=args.jobs,
        concurrencies=args.concurrency,
        pickup_samples=args.pickup_samples,
        pickup_gap_s=args.pickup_gap,
        analyze=args.analyze,
    )


def _child_argv(engine: str, args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        engine,
        "--child-out",
        str(out),
        "--jobs",
        str(args.jobs),
        "--pg-dsn",
        args.pg_dsn,
        "--concurrency",
        ",".join(str(c) for c in args.concurrency),
        "--pickup-samples",
        str(args.pickup_samples),
        "--pickup-gap",
        str(args.pickup_gap),
        "--claim-batch",
        str(args.claim_batch),
        "--pgq-batch-size",
        str(args.pgq_batch_size),
        "--finish",
        args.finish,
        *(["--analyze"] if args.analyze else []),
        *(["--quiet"] if args.quiet else []),
    ]


def run_in_child(engine: str, args: argparse.Namespace) -> EngineResult:
    """Run one engine in a fresh interpreter (own imports, own event loop, own peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="store_bench_") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(
            _child_argv(engine, args, out), check=False, timeout=args.child_timeout
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{engine}: benchmark child failed (exit {proc.returncode})")
        return EngineResult.from_dict(json.loads(out.read_text()))


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summary_rows(results: Sequence[EngineResult], concurrencies: Sequence[int]) -> list[list[str]]:
    """One row per engine: the headline figures, formatted."""
    rows = []
    for r in results:
        row = [r.engine, f"{r.enqueue.per_s:,.0f}"]
        row += [f"{r.drain[str(c)].per_s:,.0f}" for c in concurrencies]
        row += [
            f"{r.pickup.median_ms:.2f}",
            f"{r.pickup.p99_ms:.2f}",
            f"{r.peak_rss_mb:.0f}",
            "/".join(f"{x:.1f}" for x in r.details.get("load_avg_1m", [])) or "-",
        ]
        rows.append(row)
    return rows


def summary_headers(concurrencies: Sequence[int]) -> list[str]:
    """Column headers matching :func:`summary_rows`."""
    return [
        "engine",
        "enqueue/s",
        *(f"claim+finish/s c={c}" for c in concurrencies),
        "pickup p50 ms",
        "pickup p99 ms",
        "peak RSS MiB",
        "load before/after",
    ]


def compare(results: Sequence[EngineResult], concurrencies: Sequence[int]) -> dict[str, Any]:
    """Ratios of ours to the peers, and the brief's goals as pass/fail."""
    by = {r.engine: r for r in results}
    out: dict[str, Any] = {"ratios": {}, "goals": {}}
    top = str(max(concurrencies))
    for ours in ("postgres", "sqlite"):
        if ours not in by:
            continue
        o = by[ours]
        for peer in ("pgqueuer", "procrastinate"):
            if peer not in by:
                continue
            p = by[peer]
            ratios: dict[str, float | None] = {
                "enqueue": _ratio(o.enqueue.per_s, p.enqueue.per_s),
            }
            for c in concurrencies:
                ratios[f"claim+finish c={c}"] = _ratio(o.drain[str(c)].per_s, p.drain[str(c)].per_s)
            ratios["pickup p50 (lower is better)"] = _ratio(o.pickup.median_ms, p.pickup.median_ms)
            out["ratios"][f"{ours}/{peer}"] = ratios
    if "postgres" in by and "pgqueuer" in by:
        o, p = by["postgres"], by["pgqueuer"]
        out["goals"]["postgres throughput >= pgqueuer (c=" + top + ")"] = (
            o.drain[top].per_s >= p.drain[top].per_s
        )
        out["goals"]["postgres pickup p50 <= pgqueuer"] = o.pickup.median_ms <= p.pickup.median_ms
    if "sqlite" in by:
        s = by["sqlite"]
        out["goals"][f"sqlite claim+finish >= {SQLITE_GOAL_PER_S:,.0f}/s (c={top})"] = (
            s.drain[top].per_s >= SQLITE_GOAL_PER_S
        )
    return out


def render(results: Sequence[EngineResult], concurrencies: Sequence[int]) -> str:
    """The text report: headline table, CPU shares, ratios and goals."""
    lines = [format_table(summary_headers(concurrencies), summary_rows(results, concurrencies))]
    lines.append("")
    cpu_rows = []
    for r in results:
        cpu_rows.append(
            [
                r.engine,
                f"{r.enqueue.cpu_share:.2f}",
                *(f"{r.drain[str(c)].cpu_share:.2f}" for c in concurrencies),
            ]
        )
    lines.append("CPU share of the benchmark process (CPU s / wall s; 1.00 = one core busy):")
    lines.append(
        format_table(
            ["engine", "enqueue", *(f"c={c}" for c in concurrencies)],
            cpu_rows,
        )
    )
    pg_rows = [
        [
            r.engine,
            *(
                f"{r.details['pg_per_job'].get(k, 0):.2f}"
                for k in _PG_COUNTERS
                if k != "xact_rollback"
            ),
        ]
        for r in results
        if r.details.get("pg_per_job")
    ]
    if pg_rows:
        lines.append("")
        lines.append(
            "PostgreSQL work per job over the whole run (pg_stat_database; includes idle polls):"
        )
        lines.append(
            format_table(
                ["engine", "commits", "rows inserted", "rows updated", "rows deleted"], pg_rows
            )
        )
    repeated = [r for r in results if r.details.get("runs")]
    if repeated:
        lines.append("")
        lines.append("Every run's rates (the table above shows their medians):")
        keys = ["enqueue", *(f"c={c}" for c in concurrencies)]
        lines.append(
            format_table(
                ["engine", *keys],
                [
                    [
                        r.engine,
                        *(" / ".join(f"{run[k]:,.0f}" for run in r.details["runs"]) for k in keys),
                    ]
                    for r in repeated
                ],
            )
        )
    cmp = compare(results, concurrencies)
    if cmp["ratios"]:
        lines.append("")
        lines.append("Ratios (ours / peer; > 1 is better for rates, < 1 is better for pickup):")
        metric_names = list(next(iter(cmp["ratios"].values())).keys())
        ratio_rows = [
            [pair, *(_fmt_ratio(vals[m]) for m in metric_names)]
            for pair, vals in cmp["ratios"].items()
        ]
        lines.append(format_table(["pair", *metric_names], ratio_rows))
    if cmp["goals"]:
        lines.append("")
        lines.append("Goals:")
        for goal, ok in cmp["goals"].items():
            lines.append(f"  [{'met' if ok else 'MISSED'}] {goal}")
    return "\n".join(lines)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# --------------------------------------------------------------------------- CLI


def _csv_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _csv_engines(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown engine(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ENGINES)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command line of the benchmark."""
    p = argparse.ArgumentParser(
        description="Store benchmark: ours (SQLite, PostgreSQL) vs pgqueuer and procrastinate.",
    )
    p.add_argument("--jobs", type=_positive_int, default=5000, help="jobs per phase (default 5000)")
    p.add_argument(
        "--only",
        type=_csv_engines,
        default=list(ENGINES),
        help=f"comma-separated engines to run (default: {','.join(ENGINES)})",
    )
    p.add_argument(
        "--pg-dsn",
        default=os.environ.get(PG_DSN_ENV, DEFAULT_PG_DSN),
        help=f"PostgreSQL admin DSN; bench_<engine> databases are created beside it "
        f"(default: ${PG_DSN_ENV} or {DEFAULT_PG_DSN})",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        help="run every engine this many times and report medians (default 1)",
    )
    p.add_argument(
        "--concurrency",
        type=_csv_ints,
        default=[1, 50],
        help="concurrencies of the claim+finish phase (default 1,50)",
    )
    p.add_argument(
        "--pickup-samples", type=_positive_int, default=50, help="pickup samples (default 50)"
    )
    p.add_argument(
        "--pickup-gap",
        type=float,
        default=0.2,
        help="idle seconds before each pickup sample (default 0.2)",
    )
    p.add_argument(
        "--claim-batch",
        type=_positive_int,
        default=10,
        help="ours: most jobs one claim() may take at concurrency > 1 (default 10, "
        "the same as pgqueuer's default batch size)",
    )
    p.add_argument(
        "--finish",
        choices=FINISH_MODES,
        default="one-write",
        help="ours: record the job's successful SAE call with its transition (one-write, "
        "default) or as record_attempt() then transition() (two-writes)",
    )
    p.add_argument(
        "--analyze",
        action="store_true",
        help="run ANALYZE on each engine's database before each drain (what autovacuum "
        "would do; the default measures the tables as the engines leave them)",
    )
    p.add_argument(
        "--pgq-batch-size", type=_positive_int, default=10, help="pgqueuer batch_size (default 10)"
    )
    p.add_argument("--child-timeout", type=float, default=1800.0, help="seconds allowed per engine")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    # Internal: the parent re-runs this script once per engine with these two options.
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; optionally write JSON. Returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # The peers log every job at INFO; keep their chatter out of the figures and output.
    for noisy in ("pgqueuer", "procrastinate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    if args.child:
        result = asyncio.run(_child_main(args))
        write_json(args.child_out, asdict(result))
        return 0

    machine = machine_info()  # before the runs: the load average we started with
    runs: dict[str, list[EngineResult]] = {engine: [] for engine in args.only}
    for k in range(args.repeat):
        # Rotate the order so that no engine always runs right after the same neighbour.
        order = args.only[k % len(args.only) :] + args.only[: k % len(args.only)]
        for engine in order:
            log.info("=== %s (run %d of %d) ===", engine, k + 1, args.repeat)
            runs[engine].append(run_in_child(engine, args))
    results = [combine_runs(runs[engine]) for engine in args.only]
    report = render(results, args.concurrency)
    meta = {
        "command": " ".join(["bench/store_bench.py", *(argv or sys.argv[1:])]),
        "machine": machine,
        "repeat": args.repeat,
        "git": git_revision(_ROOT),
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "pickup_samples": args.pickup_samples,
        "pickup_gap_s": args.pickup_gap,
        "claim_batch": args.claim_batch,
        "finish": args.finish,
        "analyze": args.analyze,
        "pg_dsn": args.pg_dsn,
    }
    print(
        f"store benchmark: {args.jobs} no-op jobs per phase; ours: claim batch "
        f"{args.claim_batch}, finish {args.finish}; ANALYZE before drains: "
        f"{'yes' if args.analyze else 'no'}; {machine['nproc']} CPUs; "
        f"load {machine['load_avg_1m']}; {machine['date_utc']}"
        + (f"; medians of {args.repeat} runs" if args.repeat > 1 else "")
    )
    print(report)
    if args.json:
        write_json(
            args.json,
            {
                "meta": meta,
                "results": [asdict(r) for r in results],
                "comparison": compare(results, args.concurrency),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker benchmark: end-to-end throughput, reaction time, and busy-wait overshoot.

Owns the measurement of issue 4's worker figures (results and analysis in bench/README.md,
"Worker"). All three run the real ``Worker`` against the SAE simulator over loopback HTTP:

1. **throughput** — ``--jobs`` (2,000) change-order jobs queued on apps of their own, the
   simulator answering every call after ``--latency-ms`` (50 ms), ``--concurrency`` (50),
   no call budget, verification off: a job is its pre-check (DescribeChangeOrder) plus the
   abort. The simulator runs in its own process (``sae-rollback simulate``) so that it does
   not share a core with the worker. Reported: jobs/s from the first claim to the last
   finish, first calls/s (the first SAE call of each job), SAE calls/s, and the worker
   process's CPU share. The concurrency bound is ``concurrency / latency`` calls/s
   (1,000/s); with two calls per job that is 500 jobs/s.
2. **reaction** — an idle worker; one job committed at a time (``--reaction-samples``):
   time from the enqueue's commit to the arrival of the job's first SAE call at the
   simulator (in this process, stamped on arrival). SQLite enqueues through the worker's own
   store instance (the ``serve`` case, in-process wake-up); PostgreSQL through a second
   store instance (another process's view: LISTEN/NOTIFY).
3. **busy** — the app is busy (``Application.ChangerOrderRunning``) until a random moment;
   overshoot = accepted abort's arrival − that moment; calls spent, and the busy probes'
   share of a 60/min budget, against a simulator that throttles above 60 calls/min like
   SAE. Scenario "one": ``--busy-trials`` single jobs in turn (busy 2-10 s). Scenario
   "ten": ``--busy-jobs`` jobs waiting at once (busy 5-40 s): the budget must be shared
   with zero ``Throttling.User``.

Run: ``.venv/bin/python bench/worker_bench.py [--only throughput,reaction,busy]
[--engines sqlite,postgres] [--json out.json]``. PostgreSQL: ``--pg-dsn`` or
``SAE_ROLLBACK_BENCH_PG_DSN``; a database ``bench_worker_<pid>`` is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import logging  # noqa: E402

import structlog  # noqa: E402

if __name__ == "__main__":
    # The worker logs every job; keep the benchmark's own output readable. This must happen
    # before the orchestrator modules are imported (they bind their loggers at import time),
    # and only when run as a script, never when a test imports this module.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

import aiohttp  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench.common import (  # noqa: E402
    LatencySummary,
    format_table,
    git_revision,
    machine_info,
    percentile,
    timed,
    with_database,
    write_json,
)
from orchestrator.jobs import JobStatus, NewJob  # noqa: E402
from orchestrator.metrics import Metrics  # noqa: E402
from orchestrator.sae import SaeClient, StaticCredentials  # noqa: E402
from orchestrator.simulator import (  # noqa: E402
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_ACCESS_KEY_SECRET,
    SimulatorServer,
)
from orchestrator.store import Store, open_store  # noqa: E402
from orchestrator.worker import Worker, WorkerConfig  # noqa: E402

DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_DSN_ENV = "SAE_ROLLBACK_BENCH_PG_DSN"
ABORT = "AbortAndRollbackChangeOrder"
CLI = str(Path(sys.executable).with_name("sae-rollback"))


def _progress(text: str) -> None:
    print(f"[worker_bench] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- plumbing


@dataclass
class StoreHandle:
    """An opened store plus how to drop what was created for it."""

    store: Store
    url: str
    cleanup: Any = None
    extra: list[Store] = field(default_factory=list)

    async def second_instance(self) -> Store:
        """Another store instance on the same database (as another process would have)."""
        other = open_store(self.url)
        await other.open()
        self.extra.append(other)
        return other


@contextlib.asynccontextmanager
async def fresh_store(engine: str, pg_dsn: str) -> AsyncIterator[StoreHandle]:
    """A new, migrated store: a SQLite file in a temp dir, or a new PostgreSQL database."""
    if engine == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="worker_bench_"))
        url = f"sqlite:///{folder / 'bench.db'}"
        store = open_store(url)
        await store.open(migrate=True)
        handle = StoreHandle(store, url)
        try:
            yield handle
        finally:
            for s in [*handle.extra, store]:
                await s.close()
            shutil.rmtree(folder, ignore_errors=True)
        return
    import asyncpg

    name = f"bench_worker_{os.getpid()}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(pg_dsn, name)
    # A pool at least as large as the concurrency: every job in flight may be writing.
    store = open_store(url, max_size=64)
    await store.open(migrate=True)
    handle = StoreHandle(store, url)
    try:
        yield handle
    finally:
        for s in [*handle.extra, store]:
            await s.close()
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def client_for(endpoint: str) -> SaeClient:
    """A client with the simulator's default key."""
    return SaeClient(
        region="cn-hangzhou",
        credentials=StaticCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET),
        endpoint=endpoint,
        protocol="http",
        connect_timeout_s=2.0,
        read_timeout_s=10.0,
        max_connections=200,
    )


def worker_config(**overrides: Any) -> WorkerConfig:
    """Shipped defaults except what a scenario sets."""
    values: dict[str, Any] = {"owner": f"bench:{os.getpid()}", "lease_s": 30.0}
    values.update(overrides)
    return WorkerConfig(**values)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    """Run ``worker`` for the block, then stop it and wait."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def wait_all_terminal(store: Store, total: int, timeout_s: float) -> None:
    """Until the store counts ``total`` terminal jobs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = await store.stats()
        if sum(stats.counts[s] for s in JobStatus if s.is_terminal) >= total:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"jobs not finished after {timeout_s} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def simulator_process() -> AsyncIterator[tuple[str, int]]:
    """``sae-rollback simulate`` in a child process; yields its base URL and pid."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    proc = subprocess.Popen(
        [CLI, "--log-format", "json", "simulate", "--port", str(port), "--no-demo", "--seed", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{base}/_sim/healthz") as answer:
                        if answer.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the simulator did not start")
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- 1. throughput


async def _loop_lag(samples: list[float], period_s: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up, repeatedly: the event loop's scheduling lag."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(period_s)
        samples.append((loop.time() - started - period_s) * 1000)


async def bench_throughput(
    engine: str,
    pg_dsn: str,
    jobs: int,
    latency_ms: float,
    concurrency: int,
    max_jobs: int | None = None,
) -> dict[str, Any]:
    """2,000 queued jobs through the worker against a 50 ms simulator in another process."""
    async with simulator_process() as (base, sim_pid), aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/_sim/faults", json={"latency_ms": latency_ms, "count": 10_000_000}
        ) as answer:
            answer.raise_for_status()
        sem = asyncio.Semaphore(32)

        async def create(i: int) -> str:
            async with (
                sem,
                http.post(
                    f"{base}/_sim/change-orders", json={"app_id": f"tp-app-{i}", "rollback_s": 0}
                ) as answer,
            ):
                return str((await answer.json())["change_order_id"])

        orders = await asyncio.gather(*(create(i) for i in range(jobs)))
        endpoint = base.removeprefix("http://")
        async with fresh_store(engine, pg_dsn) as handle:
            store = handle.store
            ids = []
            for i, order in enumerate(orders):
                new = NewJob(
                    region="cn-hangzhou",
                    source="bench",
                    change_order_id=order,
                    app_id=f"tp-app-{i}",
                )
                ids.append((await store.enqueue(new)).job.id)
            config = worker_config(
                concurrency=concurrency,
                max_jobs=max_jobs,
                calls_per_minute=0,
                verify_enabled=False,
                gauge_interval_s=1.0,
            )
            _progress(f"throughput/{engine}: {jobs} jobs queued, running")
            async with client_for(endpoint) as client:
                worker = Worker(store, client, Metrics(CollectorRegistry()), config)
                cpu0 = time.process_time()
                sim_cpu0 = _cpu_seconds(sim_pid)
                lag_ms: list[float] = []
                async with running(worker):
                    probe = asyncio.create_task(_loop_lag(lag_ms))
                    try:
                        with timed() as wall:
                            await wait_all_terminal(store, jobs, timeout_s=600)
                    finally:
                        probe.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await probe
                cpu = time.process_time() - cpu0
                sim_cpu = _cpu_seconds(sim_pid) - sim_cpu0
            firsts: list[datetime] = []
            lasts: list[datetime] = []
            calls = 0
            statuses: dict[str, int] = {}
            call_ms: list[float] = []
            other_ms: list[float] = []
            for job_id in ids:
                job = await store.get(job_id)
                statuses[str(job.status)] = statuses.get(str(job.status), 0) + 1
                calls += len(job.attempts)
                firsts.append(job.attempts[0].started_at)
                assert job.finished_at is not None
                lasts.append(job.finished_at)
                in_calls = sum(a.duration_ms for a in job.attempts)
                call_ms.extend(a.duration_ms for a in job.attempts)
                # From the first call to the finish, the time not spent in SAE calls: the
                # store writes (attempt rows, final transition) and the event loop's latency.
                lived = (job.finished_at - job.attempts[0].started_at).total_seconds() * 1000
                other_ms.append(lived - in_calls)
        span_s = (max(lasts) - min(firsts)).total_seconds()
        first_span_s = (max(firsts) - min(firsts)).total_seconds()
        bound_calls = concurrency / (latency_ms / 1000.0)
        return {
            "engine": engine,
            "max_jobs": config.job_limit,
            "jobs": jobs,
            "statuses": statuses,
            "calls": calls,
            "wall_s": round(wall.wall_s, 3),
            "span_s": round(span_s, 3),
            "jobs_per_s": round(jobs / span_s, 1),
            "first_calls_per_s": round(jobs / first_span_s, 1) if first_span_s else None,
            "calls_per_s": round(calls / span_s, 1),
            "bound_calls_per_s": bound_calls,
            "bound_jobs_per_s": bound_calls * jobs / calls,
            "calls_pct_of_bound": round(100 * calls / span_s / bound_calls, 1),
            "worker_cpu_share": round(cpu / wall.wall_s, 2),
            "simulator_cpu_share": round(sim_cpu / wall.wall_s, 2),
            "call_ms_mean": round(statistics.fmean(call_ms), 1),
            # Little's law: the mean number of calls on the wire (the slots in use).
            "calls_in_flight_mean": round(sum(call_ms) / 1000 / span_s, 1),
            "loop_lag_ms_median": round(percentile(lag_ms, 50), 2) if lag_ms else None,
            "loop_lag_ms_p99": round(percentile(lag_ms, 99), 2) if lag_ms else None,
            "non_call_ms_per_job_mean": round(statistics.fmean(other_ms), 1),
        }


async def bench_peer(
    name: str, pg_dsn: str, jobs: int, latency_ms: float, concurrency: int
) -> dict[str, Any]:
    """The issue's yardsticks in the same run: ``jobs`` queued jobs whose body is an
    ``asyncio.sleep(latency)`` (one 50 ms "call" and no bookkeeping of ours), drained by the
    peer's own worker at ``concurrency`` jobs in flight. Its bound is ``concurrency /
    latency`` jobs/s, with one such call per job."""
    from bench.store_bench import PgQueuerEngine, ProcrastinateEngine

    job_s = latency_ms / 1000.0
    dbname = f"bench_worker_{name}_{os.getpid()}"
    engine: PgQueuerEngine | ProcrastinateEngine
    if name == "pgqueuer":
        engine = PgQueuerEngine(pg_dsn, batch_size=10, job_s=job_s, dbname=dbname)
    elif name == "procrastinate":
        engine = ProcrastinateEngine(pg_dsn, job_s=job_s, dbname=dbname)
    else:
        raise ValueError(f"unknown peer {name!r}; choose pgqueuer or procrastinate")
    try:
        await engine.setup()
        await engine.fill(0, jobs)
        _progress(f"throughput/{name}: {jobs} jobs queued, running")
        with timed() as wall:
            ran = await engine.drain(jobs, concurrency)
    finally:
        await engine.teardown()
    if ran != jobs:
        raise RuntimeError(f"{name}: ran {ran} of {jobs} jobs")
    bound = concurrency / job_s
    return {
        "engine": name,
        "version": engine.details.get("version"),
        "jobs": jobs,
        "calls": jobs,
        "wall_s": round(wall.wall_s, 3),
        "jobs_per_s": round(jobs / wall.wall_s, 1),
        "calls_per_s": round(jobs / wall.wall_s, 1),
        "bound_calls_per_s": bound,
        "calls_pct_of_bound": round(100 * jobs / wall.wall_s / bound, 1),
        "worker_cpu_share": round(wall.cpu_s / wall.wall_s, 2),
    }


# --------------------------------------------------------------------------- 2. reaction


async def bench_reaction(engine: str, pg_dsn: str, samples: int) -> dict[str, Any]:
    """Commit → first SAE call at the simulator, one job at a time into an idle worker."""
    async with SimulatorServer(seed=2) as sim, fresh_store(engine, pg_dsn) as handle:
        arrivals: dict[str, float] = {}
        arrived = asyncio.Event()
        original = sim.state.record

        def record(call: Any) -> None:
            original(call)
            if call.change_order_id and call.change_order_id not in arrivals:
                arrivals[call.change_order_id] = call.at
                arrived.set()

        sim.state.record = record  # type: ignore[method-assign]
        submit = handle.store if engine == "sqlite" else await handle.second_instance()
        config = worker_config(concurrency=16, calls_per_minute=0, verify_enabled=False)
        from_commit: list[float] = []
        async with client_for(sim.endpoint) as client:
            worker = Worker(handle.store, client, Metrics(CollectorRegistry()), config)
            async with running(worker):
                await asyncio.sleep(0.5)
                for i in range(samples):
                    order = sim.state.create_change_order(f"rx-app-{i}", rollback_s=0)
                    arrived.clear()
                    new = NewJob(
                        region="cn-hangzhou",
                        source="bench",
                        change_order_id=order.change_order_id,
                        app_id=f"rx-app-{i}",
                    )
                    await submit.enqueue(new)
                    committed = time.time()
                    await asyncio.wait_for(arrived.wait(), 10)
                    from_commit.append(arrivals[order.change_order_id] - committed)
                    # Let the job finish and the worker go idle again.
                    await wait_all_terminal(handle.store, i + 1, timeout_s=10)
                    await asyncio.sleep(0.05)
        summary = LatencySummary.from_seconds(from_commit)
        return {"engine": engine, "samples": samples, "from_commit": summary.__dict__}


# --------------------------------------------------------------------------- 3. busy


async def _busy_round(
    sim: SimulatorServer,
    store: Store,
    busy_for: list[float],
    tag: str,
) -> list[dict[str, Any]]:
    """Jobs on apps busy for the given seconds, all at once; per-job overshoot and calls."""
    orders = []
    frees = []
    for i, seconds in enumerate(busy_for):
        app = f"{tag}-{i}"
        order = sim.state.create_change_order(app, rollback_s=0.5)
        sim.state.set_busy(app, seconds)
        frees.append(sim.state.apps[app].busy_until)
        orders.append(order.change_order_id)
        await store.enqueue(
            NewJob(region="cn-hangzhou", source="bench", change_order_id=order.change_order_id)
        )
    deadline = time.monotonic() + max(busy_for) + 120
    results: list[dict[str, Any]] = []
    pending = set(range(len(orders)))
    while pending and time.monotonic() < deadline:
        for k in list(pending):
            accepted = [c for c in sim.state.calls if c.change_order_id == orders[k] and c.accepted]
            if accepted:
                mine = [c for c in sim.state.calls if c.change_order_id == orders[k]]
                probes = sorted(c.at for c in mine if c.action == ABORT)
                first = min(c.at for c in mine)
                gaps = [b - a for a, b in itertools.pairwise(probes)]
                results.append(
                    {
                        "busy_s": round(busy_for[k], 3),
                        "overshoot_s": accepted[0].at - frees[k],
                        "calls": len(mine),
                        "abort_probes": len(probes),
                        # Start-to-start spacing of the probes as the simulator saw them.
                        "probe_gap_s": statistics.fmean(gaps) if gaps else None,
                        # Probes per minute while the job waited for the app.
                        "probes_per_min": 60.0
                        * (len(probes) - 1)
                        / max(0.001, accepted[0].at - first),
                    }
                )
                pending.discard(k)
        await asyncio.sleep(0.05)
    if pending:
        raise TimeoutError(f"{len(pending)} busy jobs never got their abort accepted")
    return results


@contextlib.asynccontextmanager
async def _busy_lane(concurrency: int = 16) -> AsyncIterator[tuple[SimulatorServer, Store]]:
    """One account: a simulator throttling above 60 calls/min like SAE, a SQLite store and a
    worker with ``calls_per_minute = 60``, running for the block."""
    async with (
        SimulatorServer(seed=3, calls_per_minute=60) as sim,
        fresh_store("sqlite", DEFAULT_PG_DSN) as handle,
        client_for(sim.endpoint) as client,
    ):
        config = worker_config(
            concurrency=concurrency,
            calls_per_minute=60,
            verify_enabled=False,
            gauge_interval_s=1.0,
        )
        worker = Worker(handle.store, client, Metrics(CollectorRegistry()), config)
        async with running(worker):
            yield sim, handle.store


async def bench_busy(trials: int, ten: int, seed: int, lanes: int) -> dict[str, Any]:
    """Busy-wait overshoot at a 60/min budget: one job waiting, then ``ten`` at once.

    "One job waiting" runs in ``lanes`` independent lanes at once, each its own account
    (simulator, store, worker, budget) with one job waiting at a time, so that the sample is
    large enough for the median to mean something (a uniform [0, 4 s] overshoot's sample
    median has a standard error of about 1/sqrt(n) s).
    """
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    per_lane = [trials // lanes + (1 if k < trials % lanes else 0) for k in range(lanes)]
    plans = [[rng.uniform(2, 10) for _ in range(n)] for n in per_lane]
    done = 0

    async def lane(k: int, busy_for: list[float]) -> list[dict[str, Any]]:
        nonlocal done
        rows: list[dict[str, Any]] = []
        async with _busy_lane() as (sim, store):
            for t, seconds in enumerate(busy_for):
                rows += await _busy_round(sim, store, [seconds], f"one{k}-{t}")
                done += 1
                _progress(f"busy one-job trial {done}/{trials}: {rows[-1]['overshoot_s']:.2f} s")
            rows[0]["throttled_answers"] = sum(
                1 for c in sim.state.calls if c.code == "Throttling.User"
            )
        return rows

    lane_rows = await asyncio.gather(*(lane(k, plan) for k, plan in enumerate(plans) if plan))
    single = [row for rows in lane_rows for row in rows]
    async with _busy_lane() as (sim, store):
        started = time.time()
        many = await _busy_round(sim, store, [rng.uniform(5, 40) for _ in range(ten)], "ten")
        window = [c for c in sim.state.calls if c.at >= started]
        throttled = sum(1 for c in sim.state.calls if c.code == "Throttling.User")
    out["one"] = _busy_summary(single)
    out["one"]["lanes"] = lanes
    out["one"]["throttled_answers"] = sum(r.pop("throttled_answers", 0) for r in single)
    out["ten"] = _busy_summary(many)
    span = max(c.at for c in window) - min(c.at for c in window)
    out["ten"]["calls_per_min_all_jobs"] = round(60 * len(window) / span, 1)
    out["throttled_answers"] = throttled + out["one"]["throttled_answers"]
    out["single_trials"] = single
    return out


def _median_ci95(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval for the median (order statistics)."""
    ordered = sorted(values)
    n = len(ordered)
    half = 1.96 * (n**0.5) / 2
    lo = max(0, int(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half))
    return ordered[lo], ordered[hi]


def _busy_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    over = [r["overshoot_s"] for r in rows]
    lo, hi = _median_ci95(over)
    gaps = [r["probe_gap_s"] for r in rows if r["probe_gap_s"] is not None]
    return {
        "n": len(rows),
        "overshoot_median_s": round(statistics.median(over), 3),
        "overshoot_median_ci95_s": [round(lo, 3), round(hi, 3)],
        "overshoot_mean_s": round(statistics.fmean(over), 3),
        "probe_gap_mean_s": round(statistics.fmean(gaps), 3) if gaps else None,
        "overshoot_p90_s": round(percentile(over, 90), 3),
        "overshoot_max_s": round(max(over), 3),
        "calls_mean": round(statistics.fmean(r["calls"] for r in rows), 1),
        "probes_per_min_mean": round(statistics.fmean(r["probes_per_min"] for r in rows), 2),
        "budget_share_pct": round(
            100 * statistics.fmean(r["probes_per_min"] for r in rows) / 60, 1
        ),
    }


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected scenarios; return every result."""
    results: dict[str, Any] = {"machine": machine_info(), "revision": git_revision(_ROOT)}
    engines = [e for e in args.engines.split(",") if e]
    only = set(args.only.split(","))
    if "throughput" in only:
        results["throughput"] = []
        for engine in engines:
            row = await bench_throughput(
                engine, args.pg_dsn, args.jobs, args.latency_ms, args.concurrency, args.max_jobs
            )
            results["throughput"].append(row)
            _progress(f"throughput/{engine}: {row['jobs_per_s']} jobs/s")
        results["peers"] = []
        for peer in [p for p in args.peers.split(",") if p]:
            row = await bench_peer(peer, args.pg_dsn, args.jobs, args.latency_ms, args.concurrency)
            results["peers"].append(row)
            _progress(f"throughput/{peer}: {row['jobs_per_s']} jobs/s")
    if "reaction" in only:
        results["reaction"] = []
        for engine in engines:
            row = await bench_reaction(engine, args.pg_dsn, args.reaction_samples)
            results["reaction"].append(row)
            _progress(f"reaction/{engine}: median {row['from_commit']['median_ms']:.2f} ms")
    if "busy" in only:
        results["busy"] = await bench_busy(
            args.busy_trials, args.busy_jobs, args.seed, args.busy_lanes
        )
    return results


def report(results: dict[str, Any]) -> str:
    """The tables printed at the end."""
    parts = []
    if results.get("throughput"):
        rows = [
            (
                r["engine"],
                r["jobs"],
                r["calls"],
                f"{r['jobs_per_s']:,.0f}",
                f"{r['first_calls_per_s'] or 0:,.0f}",
                f"{r['calls_per_s']:,.0f}",
                f"{r['calls_pct_of_bound']:.0f} %",
                f"{r['worker_cpu_share']:.2f}",
                f"{r['simulator_cpu_share']:.2f}",
                f"{r['call_ms_mean']:.1f}",
                f"{r['calls_in_flight_mean']:.1f}",
                f"{r['loop_lag_ms_median'] or 0:.1f} / {r['loop_lag_ms_p99'] or 0:.1f}",
                f"{r['non_call_ms_per_job_mean']:.1f}",
            )
            for r in results["throughput"]
        ]
        parts.append(
            "Throughput (latency {} ms, concurrency {}, bound {:,.0f} calls/s)\n".format(
                results["args"]["latency_ms"],
                results["args"]["concurrency"],
                results["throughput"][0]["bound_calls_per_s"],
            )
            + format_table(
                [
                    "engine",
                    "jobs",
                    "calls",
                    "jobs/s",
                    "first calls/s",
                    "calls/s",
                    "of bound",
                    "cpu worker",
                    "cpu sim",
                    "call ms",
                    "calls in flight",
                    "loop lag ms p50/p99",
                    "other ms/job",
                ],
                rows,
            )
        )
    if results.get("peers"):
        rows = [
            (
                r["engine"],
                r["version"],
                r["jobs"],
                f"{r['jobs_per_s']:,.0f}",
                f"{r['calls_pct_of_bound']:.0f} %",
                f"{r['worker_cpu_share']:.2f}",
            )
            for r in results["peers"]
        ]
        parts.append(
            "Peers in the same run: each job one {} ms sleep, no SAE call "
            "(bound {:,.0f} jobs/s)\n".format(
                results["args"]["latency_ms"], results["peers"][0]["bound_calls_per_s"]
            )
            + format_table(["peer", "version", "jobs", "jobs/s", "of bound", "cpu"], rows)
        )
    if "reaction" in results:
        rows = [
            (
                r["engine"],
                r["samples"],
                f"{r['from_commit']['median_ms']:.2f}",
                f"{r['from_commit']['p99_ms']:.2f}",
                f"{r['from_commit']['max_ms']:.2f}",
            )
            for r in results["reaction"]
        ]
        parts.append(
            "Reaction: commit -> first SAE call (ms)\n"
            + format_table(["engine", "n", "median", "p99", "max"], rows)
        )
    if "busy" in results:
        b = results["busy"]
        rows = [
            (
                name,
                s["n"],
                f"{s['overshoot_median_s']:.2f}",
                "{:.2f}-{:.2f}".format(*s["overshoot_median_ci95_s"]),
                f"{s['overshoot_mean_s']:.2f}",
                f"{s['overshoot_p90_s']:.2f}",
                f"{s['probe_gap_mean_s'] or 0:.2f}",
                f"{s['calls_mean']:.1f}",
                f"{s['probes_per_min_mean']:.1f}",
                f"{s['budget_share_pct']:.0f} %",
            )
            for name, s in (
                (f"one job ({b['one']['lanes']} lanes)", b["one"]),
                (f"{b['ten']['n']} at once", b["ten"]),
            )
        ]
        parts.append(
            "Busy-wait overshoot at 60 calls/min (per job)\n"
            + format_table(
                [
                    "scenario",
                    "n",
                    "median s",
                    "median 95 % CI",
                    "mean s",
                    "p90 s",
                    "probe gap s",
                    "calls",
                    "probes/min",
                    "budget share",
                ],
                rows,
            )
            + f"\nall {b['ten']['n']} jobs together: "
            f"{b['ten']['calls_per_min_all_jobs']} calls/min; "
            f"Throttling.User answers: {b['throttled_answers']}"
        )
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="throughput,reaction,busy")
    p.add_argument("--engines", default="sqlite,postgres")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=50, help="SAE calls in flight")
    p.add_argument(
        "--max-jobs", type=int, default=None, help="jobs in flight (default 2 x concurrency)"
    )
    p.add_argument(
        "--peers",
        default="pgqueuer,procrastinate",
        help="queues run beside ours in the throughput scenario ('' for none)",
    )
    p.add_argument("--reaction-samples", type=int, default=100)
    p.add_argument("--busy-trials", type=int, default=400)
    p.add_argument(
        "--busy-lanes",
        type=int,
        default=20,
        help="independent accounts running the one-job trials side by side",
    )
    p.add_argument("--busy-jobs", type=int, default=10)
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--pg-dsn", default=os.environ.get(PG_DSN_ENV, DEFAULT_PG_DSN))
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run and print; optionally write JSON."""
    args = build_parser().parse_args(argv)
    results = asyncio.run(run(args))
    results["args"] = {k: v for k, v in vars(args).items() if k not in ("json", "pg_dsn")}
    results["at"] = datetime.now(UTC).isoformat()
    print(report(results))
    if args.json is not None:
        write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

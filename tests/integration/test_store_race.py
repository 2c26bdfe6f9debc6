"""Races between real processes on one store, on both engines.

* 4 processes × 4 consumers drain 2,000 jobs of 50 apps: every job finishes exactly once,
  none is lost, and no app ever has two jobs running at the same time.
* Processes enqueueing the same change order at the same moment make one job.
* A worker stalled (SIGSTOP) past its lease cannot write after another worker took over.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.jobs import AuditKind, JobStatus, NewJob
from tests.contract.engines import Engine, engine_for
from tests.integration import store_procs

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=ENGINES)
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    """An empty, migrated database of each engine."""
    async with engine_for(request.param, tmp_path) as eng:
        await eng.new_store().migrate()
        yield eng


def _run_processes(target: Any, arg_sets: list[tuple[Any, ...]], go: Any) -> None:
    """Start one process per argument tuple, release them together, wait for all."""
    procs = [SPAWN.Process(target=target, args=args) for args in arg_sets]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)  # let them import and open their stores before the barrier
        go.set()
        for p in procs:
            p.join(110)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


@pytest.mark.slow
async def test_four_processes_finish_two_thousand_jobs_exactly_once(
    engine: Engine, tmp_path: Path
) -> None:
    """Every job ends succeeded once, none is lost, and one app never runs two jobs at once."""
    n_jobs, n_apps = 2000, 50
    seed = await engine.opened()
    try:
        for chunk in range(0, n_jobs, 200):
            await asyncio.gather(
                *(
                    seed.enqueue(
                        NewJob(
                            region="cn-hangzhou",
                            source="api",
                            change_order_id=f"co-{i}",
                            app_id=f"app-{i % n_apps}",
                        )
                    )
                    for i in range(chunk, chunk + 200)
                )
            )
        go = SPAWN.Event()
        outs = [str(tmp_path / f"worker{i}.json") for i in range(4)]
        started = time.monotonic()
        await asyncio.to_thread(
            _run_processes,
            store_procs.work_until_empty,
            [(engine.url, engine.tuning, f"proc{i}", 4, go, outs[i]) for i in range(4)],
            go,
        )
        elapsed = time.monotonic() - started
        records = [tuple(r) for out in outs for r in json.loads(Path(out).read_text())]

        finished = [r[0] for r in records]
        assert len(finished) == n_jobs
        assert len(set(finished)) == n_jobs  # exactly once
        by_app: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for _job_id, app_id, start, end in records:
            by_app[app_id].append((start, end))
        for app_id, spans in by_app.items():
            spans.sort()
            for (_, prev_end), (next_start, _) in itertools.pairwise(spans):
                assert next_start >= prev_end, f"two jobs of {app_id} ran at once"
        assert all(len({r[0] for r in records if r[1] == a}) == n_jobs // n_apps for a in by_app)

        stats = await seed.stats()
        assert stats.counts[JobStatus.SUCCEEDED] == n_jobs
        assert sum(stats.counts.values()) == n_jobs
        jobs = [j for page in await _all_pages(seed) for j in page]
        assert {j.attempt_count for j in jobs} == {1}
        assert {j.call_count for j in jobs} == {1}
        sample = await seed.audit(jobs[0].id)
        assert [e.event for e in sample] == [
            AuditKind.ACCEPTED,
            AuditKind.CLAIMED,
            AuditKind.FINISHED,
        ]
        print(f"\n{engine.name}: 4 processes finished {n_jobs} jobs in {elapsed:.1f} s")
    finally:
        await seed.close()


async def _all_pages(store: Any) -> list[Any]:
    pages, cursor = [], None
    for _ in range(100):
        page = await store.list_jobs(limit=1000, cursor=cursor)
        pages.append(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    return pages


async def test_duplicate_enqueues_from_processes_make_one_job(
    engine: Engine, tmp_path: Path
) -> None:
    """4 processes × 5 simultaneous requests for one change order: one job, 19 duplicates."""
    go = SPAWN.Event()
    outs = [str(tmp_path / f"enq{i}.json") for i in range(4)]
    await asyncio.to_thread(
        _run_processes,
        store_procs.enqueue_same,
        [(engine.url, engine.tuning, "co-dup", 5, go, outs[i]) for i in range(4)],
        go,
    )
    results = [tuple(r) for out in outs for r in json.loads(Path(out).read_text())]
    assert len(results) == 20
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(not dedup for _, dedup in results) == 1
    store = await engine.opened()
    try:
        page = await store.list_jobs()
        assert len(page.items) == 1
        events = [e.event for e in await store.audit(page.items[0].id)]
        assert events.count(AuditKind.ACCEPTED) == 1
        assert events.count(AuditKind.DEDUPLICATED) == 19
    finally:
        await store.close()


async def test_a_stalled_workers_late_writes_are_rejected(engine: Engine, tmp_path: Path) -> None:
    """SIGSTOP a worker past its lease; after rescue and re-claim its writes all fail."""
    store = await engine.opened()
    proc = None
    try:
        await store.enqueue(NewJob(region="r", source="api", change_order_id="co-1", app_id="a"))
        claimed_file, resume_file = tmp_path / "claimed.json", tmp_path / "resume"
        out = tmp_path / "stalled.json"
        proc = SPAWN.Process(
            target=store_procs.stalled_worker,
            args=(engine.url, engine.tuning, 0.3, str(claimed_file), str(resume_file), str(out)),
        )
        proc.start()
        for _ in range(1500):
            if claimed_file.exists():
                break
            await asyncio.sleep(0.01)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)  # a long GC pause, a frozen VM...
        job_id = json.loads(claimed_file.read_text())["job_id"]

        await asyncio.sleep(0.5)  # the lease (0.3 s) runs out
        assert await store.rescue_expired(max_interrupts=5) == 1
        taken = await store.claim("healthy", 30, 1)
        assert [c.job.id for c in taken] == [job_id]
        await store.transition(job_id, taken[0].token, JobStatus.SUCCEEDED)
        before = await store.get(job_id)
        audit_before = await store.audit(job_id)

        resume_file.write_text("go")
        os.kill(proc.pid, signal.SIGCONT)
        await asyncio.to_thread(proc.join, 60)
        assert proc.exitcode == 0
        outcomes = json.loads(out.read_text())
        assert outcomes == dict.fromkeys(
            ["heartbeat", "record_attempt", "transition", "schedule_retry", "release"],
            "LeaseLost",
        )
        assert await store.get(job_id) == before
        assert await store.audit(job_id) == audit_before
        assert before.status is JobStatus.SUCCEEDED
        assert before.attempts == ()
    finally:
        if proc is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGCONT)  # type: ignore[arg-type]
            proc.kill()
            proc.join()
        await store.close()

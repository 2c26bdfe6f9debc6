"""Code that runs in child processes (multiprocessing "spawn") for the store race tests.

Each function is a process entry point: it opens its own store on the shared database,
waits at a start barrier so the processes really race, and writes what it observed to a
JSON file for the parent to check.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import UTC, datetime
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from orchestrator.errors import LeaseLost
from orchestrator.jobs import AttemptIn, AttemptOutcome, JobStatus, NewJob
from orchestrator.store import Store, open_store


def _dump(path: str, data: Any) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # the parent never reads a half-written file


def work_until_empty(
    url: str, tuning: dict[str, Any], owner: str, tasks: int, go: Event, out: str
) -> None:
    """Claim and finish jobs with ``tasks`` concurrent consumers until none is left.

    For each job it records (job, app, start, end) on the system-wide monotonic clock,
    where [start, end] lies inside the time the job was really running: start after the
    claim returned, end before the finishing write was sent. A short random pause in
    between makes overlapping runs of one app visible if the store ever allowed them.
    """
    asyncio.run(_work_until_empty(url, tuning, owner, tasks, go, out))


async def _work_until_empty(
    url: str, tuning: dict[str, Any], owner: str, tasks: int, go: Event, out: str
) -> None:
    store = open_store(url, **tuning)
    await store.open()
    records: list[tuple[str, str | None, float, float]] = []
    try:
        await asyncio.to_thread(go.wait, 60)
        deadline = time.monotonic() + 90
        await asyncio.gather(
            *(_consume(store, f"{owner}/{i}", records, deadline) for i in range(tasks))
        )
    finally:
        await store.close()
    _dump(out, records)


async def _consume(
    store: Store, owner: str, records: list[tuple[str, str | None, float, float]], deadline: float
) -> None:
    while time.monotonic() < deadline:
        claimed = await store.claim(owner, 30, 2)
        if not claimed:
            stats = await store.stats()
            left = sum(stats.counts[s] for s in (JobStatus.QUEUED, JobStatus.WAITING))
            if left == 0:
                return
            await store.wait_for_work(0.05)
            continue
        for c in claimed:
            start = time.monotonic()
            await asyncio.sleep(random.uniform(0, 0.002))
            now = datetime.now(UTC)
            ok = AttemptIn("AbortAndRollbackChangeOrder", now, 1, AttemptOutcome.SUCCESS, 200)
            await store.record_attempt(c.job.id, c.token, ok)
            end = time.monotonic()
            await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
            records.append((c.job.id, c.job.app_id, start, end))


def enqueue_same(
    url: str, tuning: dict[str, Any], change_order_id: str, n: int, go: Event, out: str
) -> None:
    """Enqueue the same change order ``n`` times at once after the barrier."""
    asyncio.run(_enqueue_same(url, tuning, change_order_id, n, go, out))


async def _enqueue_same(
    url: str, tuning: dict[str, Any], change_order_id: str, n: int, go: Event, out: str
) -> None:
    store = open_store(url, **tuning)
    await store.open()
    try:
        await asyncio.to_thread(go.wait, 60)
        new = NewJob(
            region="cn-hangzhou",
            source="alertmanager",
            change_order_id=change_order_id,
            app_id="app-dup",
            idempotency_key=f"fp-{change_order_id}",
        )
        results = await asyncio.gather(*(store.enqueue(new) for _ in range(n)))
    finally:
        await store.close()
    _dump(out, [(r.job.id, r.deduplicated) for r in results])


def stalled_worker(
    url: str, tuning: dict[str, Any], lease_s: float, claimed_file: str, resume_file: str,
    out: str,
) -> None:  # fmt: skip
    """Claim one job, stall (the parent SIGSTOPs us), then try every write with the old lease."""
    asyncio.run(_stalled_worker(url, tuning, lease_s, claimed_file, resume_file, out))


async def _stalled_worker(
    url: str, tuning: dict[str, Any], lease_s: float, claimed_file: str, resume_file: str,
    out: str,
) -> None:  # fmt: skip
    store = open_store(url, **tuning)
    await store.open()
    outcomes: dict[str, str] = {}
    try:
        claimed = await store.claim("stalled", lease_s, 1)
        job_id, token = claimed[0].job.id, claimed[0].token
        _dump(claimed_file, {"job_id": job_id})
        # The parent stops this process here; after SIGCONT we wait for its go-ahead so
        # the late writes surely come after the other worker finished the job.
        for _ in range(3000):
            if Path(resume_file).exists():
                break
            await asyncio.sleep(0.01)
        late = AttemptIn(
            "AbortAndRollbackChangeOrder", datetime.now(UTC), 1, AttemptOutcome.SUCCESS
        )
        writes = {
            "heartbeat": store.heartbeat(job_id, token, 30),
            "record_attempt": store.record_attempt(job_id, token, late),
            "transition": store.transition(job_id, token, JobStatus.FAILED, "late", "late"),
            "schedule_retry": store.schedule_retry(job_id, token, delay_s=0),
            "release": store.release(job_id, token),
        }
        for name, write in writes.items():
            try:
                await write
            except LeaseLost:
                outcomes[name] = "LeaseLost"
            else:
                outcomes[name] = "written"
    finally:
        await store.close()
    _dump(out, outcomes)

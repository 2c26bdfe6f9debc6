"""The worker loop: bounded concurrency, wake-ups, lease renewal, drain, and supervision."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator.errors import LeaseLost
from orchestrator.jobs import JobStatus, NewJob
from orchestrator.store import Store
from orchestrator.worker import Worker, WorkerConfig, WorkerCrashed

from .worker_fakes import ABORT, DESCRIBE, FakeSae, metrics, sample, sqlite


def cfg(**overrides: Any) -> WorkerConfig:
    """Quick settings for loop tests."""
    values: dict[str, Any] = {
        "owner": "unit-runner",
        "concurrency": 4,
        "lease_s": 5.0,
        "drain_grace_s": 2.0,
        "retry_initial_s": 0.05,
        "retry_max_interval_s": 0.2,
        "verify_enabled": False,
        "verify_poll_interval_s": 0.05,
        "calls_per_minute": 0.0,
        "gauge_interval_s": 0.05,
        "idle_poll_s": 5.0,
    }
    values.update(overrides)
    return WorkerConfig(**values)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh SQLite store."""
    s = await sqlite(tmp_path)
    try:
        yield s
    finally:
        await s.close()


async def enqueue(store: Store, sae: FakeSae, n: int) -> list[str]:
    """``n`` jobs on ``n`` apps, each with a running change order."""
    ids = []
    for i in range(n):
        sae.order(f"co-{i}", f"app-{i}")
        new = NewJob(
            region="cn-hangzhou", source="unit", change_order_id=f"co-{i}", app_id=f"app-{i}"
        )
        ids.append((await store.enqueue(new)).job.id)
    return ids


async def settled(store: Store, ids: list[str], timeout_s: float = 10.0) -> dict[str, Any]:
    """Wait until every job is terminal."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = {i: await store.get(i) for i in ids}
        if all(j.status.is_terminal for j in jobs.values()):
            return jobs
        await asyncio.sleep(0.02)
    raise AssertionError("jobs did not settle")


async def test_concurrency_is_bounded(store: Store) -> None:
    """Twenty jobs with concurrency 4: never more than 4 calls in flight, all succeed."""
    sae = FakeSae(latency_s=0.03)
    ids = await enqueue(store, sae, 20)
    worker = Worker(store, sae, metrics(), cfg(concurrency=4))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    jobs = await settled(store, ids)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    assert sae.max_in_flight == 4
    assert worker.in_flight == 0


async def test_idle_worker_wakes_on_enqueue(store: Store) -> None:
    """An idle worker (5 s poll) starts a newly committed job within milliseconds."""
    sae = FakeSae()
    worker = Worker(store, sae, metrics(), cfg(idle_poll_s=5.0))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.2)  # idle now
    started = time.monotonic()
    ids = await enqueue(store, sae, 1)
    while not sae.calls:
        await asyncio.sleep(0.001)
    reaction = time.monotonic() - started
    await settled(store, ids)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert reaction < 0.5


async def test_sigterm_lets_in_flight_calls_finish(store: Store) -> None:
    """Stop during a slow abort: the call finishes, the job succeeds, run returns in grace."""
    sae = FakeSae()
    sae.slow[ABORT] = 0.5
    ids = await enqueue(store, sae, 2)
    worker = Worker(store, sae, metrics(), cfg(drain_grace_s=3.0))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while sae.count(ABORT) < 2:
        await asyncio.sleep(0.01)
    stopped = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - stopped < 3.0
    jobs = {i: await store.get(i) for i in ids}
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}


async def test_drain_releases_jobs_between_calls(store: Store) -> None:
    """Verifying jobs are given back at drain (due at once), not held until the grace ends."""
    sae = FakeSae()
    sae.after_abort_status = 1  # the rollbacks keep running
    ids = await enqueue(store, sae, 3)
    worker = Worker(store, sae, metrics(), cfg(verify_enabled=True, verify_poll_interval_s=10))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while sae.count(ABORT) < 3:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    stopped = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - stopped < 0.5
    for job_id in ids:
        job = await store.get(job_id)
        assert job.status is JobStatus.WAITING
        assert job.lease_token is None


async def test_drain_timeout_cancels_and_releases_for_reconcile(store: Store) -> None:
    """A call still hanging when the grace ends is cancelled; its job is marked for reconcile."""
    sae = FakeSae()
    sae.slow[ABORT] = 30.0
    ids = await enqueue(store, sae, 1)
    worker = Worker(store, sae, metrics(), cfg(drain_grace_s=0.6))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while sae.count(ABORT) < 1:
        await asyncio.sleep(0.01)
    stopped = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - stopped < 0.9
    job = await store.get(ids[0])
    assert job.status is JobStatus.WAITING
    assert job.needs_reconcile


async def test_heartbeats_keep_a_long_job_leased(store: Store) -> None:
    """A call longer than the lease does not get the job rescued from under the worker."""
    sae = FakeSae()
    sae.slow[ABORT] = 1.0
    ids = await enqueue(store, sae, 1)
    worker = Worker(store, sae, metrics(), cfg(lease_s=0.3, rescue_interval_s=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    jobs = await settled(store, ids)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert jobs[ids[0]].status is JobStatus.SUCCEEDED
    assert "rescued" not in [str(e.event) for e in await store.audit(ids[0])]
    assert sae.count(ABORT) == 1


class LeaseStealingStore:
    """Delegates to a real store, but every heartbeat reports the lease lost."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def heartbeat(self, job_id: str, token: str, lease_s: float) -> Any:
        raise LeaseLost(f"job {job_id} was taken over")


async def test_lost_lease_stops_the_run(store: Store) -> None:
    """When a heartbeat finds the lease gone, the run is cancelled and writes nothing more."""
    sae = FakeSae()
    sae.slow[ABORT] = 5.0
    ids = await enqueue(store, sae, 1)
    worker = Worker(LeaseStealingStore(store), sae, metrics(), cfg(lease_s=0.3))  # type: ignore[arg-type]
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        while worker.in_flight == 0 or sae.count(ABORT) == 0:
            await asyncio.sleep(0.01)
        while worker.in_flight:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert any(entry["event"] == "lease_lost" for entry in logs)
    job = await store.get(ids[0])
    assert job.status is JobStatus.RUNNING  # left for rescue; nothing written over it
    assert [a.action for a in job.attempts] == ["DescribeChangeOrder"]


class BrokenStatsStore(LeaseStealingStore):
    """Delegates to a real store; ``stats`` fails with a bug."""

    async def heartbeat(self, job_id: str, token: str, lease_s: float) -> Any:
        return await self._inner.heartbeat(job_id, token, lease_s)

    async def stats(self) -> Any:
        raise RuntimeError("gauge bug")


async def test_dying_side_task_stops_the_worker_loudly(store: Store) -> None:
    """A side task failing with a bug makes run() raise, after releasing jobs in flight."""
    sae = FakeSae()
    sae.slow[ABORT] = 30.0
    ids = await enqueue(store, sae, 1)
    worker = Worker(BrokenStatsStore(store), sae, metrics(), cfg(gauge_interval_s=0.3))  # type: ignore[arg-type]
    with capture_logs() as logs, pytest.raises(WorkerCrashed, match="gauge bug"):
        await asyncio.wait_for(worker.run(asyncio.Event()), 5)
    assert any(e["event"] == "worker_task_died" and e["task"] == "gauges" for e in logs)
    job = await store.get(ids[0])
    assert job.lease_token is None  # released on the way out


async def test_gauges_and_budget_metric_are_set(store: Store) -> None:
    """The jobs gauge follows the store; the budget gauge shows the configured budget."""
    sae = FakeSae()
    ids = await enqueue(store, sae, 3)
    m = metrics()
    worker = Worker(store, sae, m, cfg(calls_per_minute=6000))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await settled(store, ids)
    await asyncio.sleep(0.15)  # one gauge refresh after the last job
    stop.set()
    await asyncio.wait_for(task, 5)
    assert sample(m, "sae_rollback_jobs", {"status": "succeeded"}) == 3
    assert sample(m, "sae_rollback_jobs", {"status": "queued"}) == 0
    assert sample(m, "sae_rollback_api_budget_per_minute") == 6000
    assert sample(m, "sae_rollback_oldest_queued_age_seconds") == 0


async def test_stop_before_start_returns_at_once(store: Store) -> None:
    """A worker told to stop before it claimed anything returns promptly, claiming nothing."""
    sae = FakeSae()
    ids = await enqueue(store, sae, 1)
    stop = asyncio.Event()
    stop.set()
    worker = Worker(store, sae, metrics(), cfg())
    await asyncio.wait_for(worker.run(stop), 2)
    assert (await store.get(ids[0])).status is JobStatus.QUEUED
    assert sae.calls == []


def test_config_validation() -> None:
    """Nonsense settings are refused with the key's name."""
    with pytest.raises(ValueError, match="concurrency"):
        cfg(concurrency=0)
    with pytest.raises(ValueError, match="lease_s"):
        cfg(lease_s=0)
    with pytest.raises(ValueError, match="calls_per_minute"):
        cfg(calls_per_minute=-1)
    assert cfg(lease_s=30).effective_rescue_interval_s == 15
    assert cfg(lease_s=30).heartbeat_interval_s == 10


async def test_concurrency_bounds_calls_not_jobs(store: Store) -> None:
    """Jobs sleeping between verification polls hold no call slot: 8 verify with 2 slots."""
    sae = FakeSae(latency_s=0.01)
    sae.after_abort_status = 1  # the rollback keeps running until the test ends it
    ids = await enqueue(store, sae, 8)
    config = cfg(concurrency=2, max_jobs=8, verify_enabled=True, verify_poll_interval_s=0.05)
    worker = Worker(store, sae, metrics(), config)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    deadline = time.monotonic() + 10
    while (await store.stats()).counts[JobStatus.VERIFYING] < 8:
        assert time.monotonic() < deadline, "the jobs did not all reach verifying"
        await asyncio.sleep(0.02)
    assert worker.in_flight == 8
    await asyncio.sleep(0.25)  # each verifying job polls a few times meanwhile
    assert sae.count(DESCRIBE) >= 8 + 8 * 2  # pre-checks, then at least two polls each
    for i in range(8):
        sae.status[f"co-{i}"] = 6  # rolled back: the next poll finishes each job
    jobs = await settled(store, ids)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    assert sae.max_in_flight == 2


async def test_jobs_in_flight_are_bounded_by_max_jobs(store: Store) -> None:
    """``max_jobs`` caps the leased jobs (default twice the concurrency)."""
    assert cfg(concurrency=3).job_limit == 6
    assert cfg(concurrency=3, max_jobs=4).job_limit == 4
    with pytest.raises(ValueError, match="max_jobs"):
        cfg(max_jobs=0)
    sae = FakeSae(latency_s=0.02)
    ids = await enqueue(store, sae, 12)
    worker = Worker(store, sae, metrics(), cfg(concurrency=8, max_jobs=3))
    peak = 0
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    deadline = time.monotonic() + 10
    while sae.count(ABORT) < len(ids):
        assert time.monotonic() < deadline, "the jobs did not all run"
        peak = max(peak, worker.in_flight)
        await asyncio.sleep(0.002)
    await settled(store, ids)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert peak == 3
    assert sae.max_in_flight <= 3


async def test_a_backlog_is_claimed_in_batches(store: Store) -> None:
    """With more due jobs than places, refills wait for a quarter of max_jobs to be free."""
    sae = FakeSae(latency_s=0.005)
    ids = await enqueue(store, sae, 60)
    claims: list[tuple[int, int]] = []
    real_claim = store.claim

    async def claim(owner: str, lease_s: float, limit: int) -> Any:
        got = await real_claim(owner, lease_s, limit)
        claims.append((limit, len(got)))
        return got

    store.claim = claim  # type: ignore[method-assign]
    worker = Worker(store, sae, metrics(), cfg(concurrency=4, max_jobs=16))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    jobs = await settled(store, ids)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    assert claims[0] == (16, 16)
    after_full = [limit for (prev, got), (limit, _) in itertools.pairwise(claims) if got == prev]
    assert after_full
    assert min(after_full) >= 4  # never one claim per finished job while there is a backlog
    assert len(claims) <= 60 // 4 + 4


async def test_jobs_waiting_for_a_call_slot_start_no_call_once_draining(store: Store) -> None:
    """One slot, one slow call: at drain the queued jobs are released without calling."""
    sae = FakeSae()
    sae.slow[DESCRIBE] = 0.3
    ids = await enqueue(store, sae, 3)
    worker = Worker(store, sae, metrics(), cfg(concurrency=1, max_jobs=3))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while not sae.calls or worker.in_flight < 3:
        await asyncio.sleep(0.005)
    stop.set()  # two jobs are waiting for the slot the first pre-check holds
    await asyncio.wait_for(task, 5)
    assert len(sae.calls) == 1  # only the pre-check that held the slot
    jobs = [await store.get(i) for i in ids]
    assert sorted(str(j.status) for j in jobs) == ["queued", "queued", "waiting"]
    assert all(j.lease_token is None for j in jobs)

"""The account-wide call budget against a simulator that throttles like SAE (sliding window).

100 jobs need at least 300 calls (pre-check, abort, verification) at 600 calls per minute:
the worker must get every one through without a single ``Throttling.User``, and must not
take longer than the budget itself requires.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.jobs import JobStatus
from orchestrator.simulator import SimulatorServer
from orchestrator.worker import Priority, Worker
from orchestrator.worker.budget import bucket_shape

from .worker_harness import (
    TEST_ACCESS_KEY_ID,
    TEST_ACCESS_KEY_SECRET,
    config,
    enqueue,
    new_metrics,
    running,
    sae_client,
    sqlite_store,
    wait_terminal,
)

CALLS_PER_MINUTE = 600
JOBS = 100

pytestmark = pytest.mark.slow


async def test_budget_keeps_a_throttling_simulator_quiet(tmp_path: Path) -> None:
    """100 jobs at 600 calls/min: zero Throttling.User, and no slower than the budget allows."""
    async with SimulatorServer(
        credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET},
        seed=7,
        calls_per_minute=CALLS_PER_MINUTE,
    ) as sim:
        orders = [
            sim.state.create_change_order(f"budget-app-{i}", rollback_s=0.2).change_order_id
            for i in range(JOBS)
        ]
        store = await sqlite_store(tmp_path)
        try:
            async with sae_client(sim.endpoint) as client:
                job_ids = [await enqueue(store, change_order_id=order) for order in orders]
                worker = Worker(
                    store,
                    client,
                    new_metrics(),
                    config(
                        concurrency=JOBS,
                        calls_per_minute=CALLS_PER_MINUTE,
                        verify_poll_interval_s=0.5,
                    ),
                )
                started = time.monotonic()
                async with running(worker):
                    jobs = await wait_terminal(store, job_ids, timeout_s=90)
                    elapsed = time.monotonic() - started
        finally:
            await store.close()
        calls = [call.as_json() for call in sim.state.calls]

    assert {job.status for job in jobs.values()} == {JobStatus.SUCCEEDED}
    codes = Counter(call["code"] for call in calls)
    assert codes["Throttling.User"] == 0, codes
    assert len(calls) >= 3 * JOBS
    assert sum(1 for call in calls if call["accepted"]) == JOBS
    # The budget's own pace: the burst at once, then the refill rate.
    rate_per_min, burst = bucket_shape(CALLS_PER_MINUTE)
    required = (len(calls) - burst) * 60.0 / rate_per_min
    assert elapsed <= required * 1.1 + 2.0, (elapsed, required, len(calls))
    # And it really was paced by the budget, not by anything faster.
    assert elapsed >= required * 0.95, (elapsed, required)
    # Every pre-check and abort was a first call; the verification polls had the lowest
    # priority, and still the budget was used to the full.
    assert worker.budget.granted[Priority.FIRST] == 2 * JOBS
    assert worker.budget.granted[Priority.POLL] >= JOBS

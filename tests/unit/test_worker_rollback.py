"""One job's flow (``JobRun``) against a scripted SAE and a real SQLite store.

Each test claims a job, runs one ``JobRun`` to its end, and checks the run's result, the
stored job (status, error, attempts, reconcile flag) and which SAE calls were made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tenacity
from structlog.testing import capture_logs

from orchestrator.jobs import AttemptOutcome, Claimed, Job, JobStatus, NewJob
from orchestrator.metrics import Metrics
from orchestrator.store import Store
from orchestrator.worker.breaker import CircuitBreaker
from orchestrator.worker.budget import CallBudget, LocalTokens, Priority
from orchestrator.worker.retry import RetryPolicy
from orchestrator.worker.rollback import FlowDeps, JobRun, RunResult

from .worker_fakes import (
    ABORT,
    APP_STATUS,
    DESCRIBE,
    FakeSae,
    busy,
    metrics,
    not_running,
    permanent,
    sample,
    server_error,
    sqlite,
    throttled,
    transport,
)

OWNER = "unit-worker"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh SQLite store."""
    s = await sqlite(tmp_path)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def sae() -> FakeSae:
    """A scripted SAE with order co-1 of app-1 running."""
    fake = FakeSae()
    fake.order("co-1", "app-1")
    return fake


class Rig:
    """Builds runs that share one store, SAE, metrics and budget."""

    def __init__(self, store: Store, sae: FakeSae) -> None:
        self.store = store
        self.sae = sae
        self.metrics: Metrics = metrics()
        self.budget = CallBudget(None)
        self.draining = asyncio.Event()
        self.settings: dict[str, Any] = {
            "max_attempts": 10,
            "verify_enabled": True,
            "verify_poll_interval_s": 0.01,
            "verify_timeout_s": 5.0,
        }
        self.policy = RetryPolicy(
            initial_s=0.05, max_interval_s=0.2, max_elapsed_s=60.0, wait=tenacity.wait_fixed(0.05)
        )

    def deps(self) -> FlowDeps:
        return FlowDeps(
            store=self.store,
            client=self.sae,
            budget=self.budget,
            metrics=self.metrics,
            policy=self.policy,
            owner=OWNER,
            lease_s=5.0,
            draining=self.draining,
            waiting_jobs=lambda: 0,
            wall_clock=lambda: datetime.now(UTC),
            monotonic=asyncio.get_running_loop().time,
            **self.settings,
        )

    async def enqueue(self, **fields: Any) -> str:
        new = NewJob(region="cn-hangzhou", source="unit", **fields)
        return (await self.store.enqueue(new)).job.id

    async def claim(self, lease_s: float = 5.0) -> Claimed:
        claimed = await self.store.claim(OWNER, lease_s, 1)
        assert len(claimed) == 1, claimed
        return claimed[0]

    async def run(self, claimed: Claimed | None = None) -> tuple[RunResult, Job]:
        """Claim (unless given) and run one job; make it due again if it was scheduled."""
        claimed = claimed or await self.claim()
        result = await JobRun(self.deps(), claimed).run()
        return result, await self.store.get(claimed.job.id)

    async def run_until_settled(self, job_id: str, runs: int = 10) -> Job:
        """Run the job again and again (ignoring retry waits) until it is terminal."""
        for _ in range(runs):
            job = await self.store.get(job_id)
            if job.status.is_terminal:
                return job
            if job.next_attempt_at is not None:
                await asyncio.sleep(
                    max(0.0, (job.next_attempt_at - datetime.now(UTC)).total_seconds())
                )
            await self.run()
        raise AssertionError(f"job not settled after {runs} runs")


@pytest.fixture
def rig(store: Store, sae: FakeSae) -> Rig:
    """Runs over the shared fixtures."""
    return Rig(store, sae)


async def test_accepted_abort_is_verified_and_succeeds(rig: Rig) -> None:
    """Pre-check, abort, verify: succeeded, each call an attempt, metrics counted once."""
    job_id = await rig.enqueue(change_order_id="co-1", app_id="app-1")
    result, job = await rig.run()
    assert result is RunResult.SUCCEEDED
    assert job.status is JobStatus.SUCCEEDED
    assert [a.action for a in job.attempts] == [DESCRIBE, ABORT, DESCRIBE]
    assert all(a.request_id and a.trace_id for a in job.attempts)
    assert rig.sae.accepted == ["co-1"]
    assert sample(rig.metrics, "sae_rollback_time_to_first_call_seconds_count") == 1
    labels = {"status": "succeeded"}
    assert sample(rig.metrics, "sae_rollback_jobs_finished_total", labels) == 1
    assert sample(rig.metrics, "sae_rollback_job_duration_seconds_count", labels) == 1
    assert (await rig.store.get(job_id)).error_code is None


async def test_verification_reports_a_failed_rollback(rig: Rig) -> None:
    """A rollback that ends in status 3 fails the job with what SAE reported."""
    rig.sae.after_abort_status = 3
    rig.sae.error_message["co-1"] = "batch 1 failed"
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.FAILED
    assert job.error_code == "rollback_failed"
    assert job.error_message == "change order co-1 ended with status 3 (failed): batch 1 failed"


async def test_verification_rides_out_transient_errors(rig: Rig) -> None:
    """Throttled and 5xx polls are retried in place until the rollback is seen finished."""
    rig.sae.then(DESCRIBE, None, throttled(DESCRIBE), server_error(DESCRIBE))
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.SUCCEEDED
    assert [a.outcome for a in job.attempts if a.action == DESCRIBE] == [
        AttemptOutcome.SUCCESS,
        AttemptOutcome.RETRY,
        AttemptOutcome.RETRY,
        AttemptOutcome.SUCCESS,
    ]
    assert sample(rig.metrics, "sae_rollback_retries_total", {"reason": "throttled"}) == 1
    assert sample(rig.metrics, "sae_rollback_retries_total", {"reason": "server"}) == 1


async def test_verification_without_verify_succeeds_at_accept(rig: Rig) -> None:
    """With [verify] enabled = false the accepted abort is the success."""
    rig.settings["verify_enabled"] = False
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.SUCCEEDED
    assert [a.action for a in job.attempts] == [DESCRIBE, ABORT]


async def test_drained_verification_resumes_without_second_abort(rig: Rig) -> None:
    """A job released while verifying goes straight back to verifying on its next run."""
    rig.sae.after_abort_status = 1  # the rollback keeps running for now
    rig.settings["verify_poll_interval_s"] = 30.0
    job_id = await rig.enqueue(change_order_id="co-1")
    run = asyncio.create_task(rig.run())
    while rig.sae.count(ABORT) == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    rig.draining.set()
    result, job = await asyncio.wait_for(run, 5)
    assert result is RunResult.RELEASED
    assert job.status is JobStatus.WAITING
    assert job.lease_token is None
    rig.draining.clear()
    rig.sae.status["co-1"] = 6
    result, job = await rig.run()
    assert result is RunResult.SUCCEEDED
    assert rig.sae.count(ABORT) == 1
    assert [a.action for a in job.attempts] == [DESCRIBE, ABORT, DESCRIBE]
    assert job.id == job_id


async def test_busy_schedules_a_visible_retry(rig: Rig) -> None:
    """A busy app puts the job in waiting with next_attempt_at, not marked for reconcile."""
    rig.sae.then(ABORT, busy())
    await rig.enqueue(change_order_id="co-1")
    before = datetime.now(UTC)
    result, job = await rig.run()
    assert result is RunResult.RETRY
    assert job.status is JobStatus.WAITING
    assert job.next_attempt_at is not None
    assert job.next_attempt_at > before
    assert job.error_code == "Application.ChangerOrderRunning"
    assert not job.needs_reconcile
    assert sample(rig.metrics, "sae_rollback_retries_total", {"reason": "busy"}) == 1
    job = await rig.run_until_settled(job.id)
    assert job.status is JobStatus.SUCCEEDED
    # The retry run skipped the pre-check (done already) and went straight to the abort.
    assert [a.action for a in job.attempts] == [DESCRIBE, ABORT, ABORT, DESCRIBE]


async def test_ambiguous_abort_is_reconciled_before_calling_again(rig: Rig) -> None:
    """After a read timeout the next run reads the order first, and the mark survives busy."""
    rig.sae.then(ABORT, transport(), busy())
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.RETRY
    assert job.needs_reconcile
    result, job = await _run_due(rig, job)
    # Reconcile read, then a busy abort: still unsettled, so still marked.
    assert [a.action for a in job.attempts][-2:] == [DESCRIBE, ABORT]
    assert result is RunResult.RETRY
    assert job.needs_reconcile
    job = await rig.run_until_settled(job.id)
    assert job.status is JobStatus.SUCCEEDED
    assert rig.sae.accepted == ["co-1"]


async def _run_due(rig: Rig, job: Job) -> tuple[RunResult, Job]:
    if job.next_attempt_at is not None:
        await asyncio.sleep(max(0.0, (job.next_attempt_at - datetime.now(UTC)).total_seconds()))
    return await rig.run()


async def test_reconcile_finds_the_rollback_done(rig: Rig) -> None:
    """A lost answer whose abort took effect: the reconcile sees 6 and succeeds, no re-abort."""

    def lost_answer(change_order_id: str) -> None:
        rig.sae.status[change_order_id] = 6
        raise transport(kind=transport().kind)

    rig.sae.then(ABORT, lost_answer)
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.RETRY
    assert job.needs_reconcile
    result, job = await _run_due(rig, job)
    assert result is RunResult.SUCCEEDED
    assert rig.sae.count(ABORT) == 1
    assert [a.action for a in job.attempts] == [DESCRIBE, ABORT, DESCRIBE]


async def test_not_running_on_ended_order_is_skipped(rig: Rig) -> None:
    """Not.Running and the order ended by itself (2): skipped with its status, not failed."""

    def finished(change_order_id: str) -> None:
        rig.sae.status[change_order_id] = 2
        raise not_running()

    rig.sae.then(ABORT, finished)
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.SKIPPED
    assert job.error_code == "already_terminal"
    assert job.error_message is not None
    assert "2 (succeeded)" in job.error_message


async def test_permanent_error_fails_with_sae_code(rig: Rig) -> None:
    """A permanent answer fails the job with SAE's code and message."""
    rig.sae.then(ABORT, permanent())
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.FAILED
    assert job.error_code == "Resouce.no.permission"
    assert job.error_message == "simulated Resouce.no.permission"
    assert job.attempts[-1].outcome is AttemptOutcome.FAILED


async def test_app_only_job_duplicating_a_live_job_is_skipped(rig: Rig) -> None:
    """Resolving to an order another live job already has: skipped as a duplicate."""
    await rig.enqueue(app_id="app-1")
    other = await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.SKIPPED
    assert job.error_code == "duplicate"
    assert other in (job.error_message or "")
    assert [a.action for a in job.attempts] == [APP_STATUS]


async def test_app_only_job_finds_waiting_order_in_list(rig: Rig) -> None:
    """No running last order: ListChangeOrders' newest non-terminal order is the target."""
    rig.sae.order("co-1", "app-1", status=8)  # paused for batch confirmation

    def not_running_now(app_id: str) -> Any:
        return None

    rig.sae.then(APP_STATUS, not_running_now)
    rig.sae.order("co-0", "app-2", status=2)
    await rig.enqueue(app_id="app-1")
    result, job = await rig.run()
    assert job.change_order_id == "co-1"
    assert result is RunResult.SUCCEEDED


async def test_change_order_job_waits_while_its_app_is_held(rig: Rig) -> None:
    """The app learnt at the pre-check is held by another running job: retry, no abort."""
    rig.sae.order("co-2", "app-1", status=1)
    await rig.enqueue(change_order_id="co-1", app_id="app-1")
    await rig.enqueue(change_order_id="co-2")
    holder = await rig.claim()
    assert holder.job.change_order_id == "co-1"
    result, job = await rig.run()
    assert result is RunResult.RETRY
    assert job.error_code == "app_busy"
    assert rig.sae.count(ABORT) == 0


async def test_dry_run_calls_nothing(rig: Rig) -> None:
    """A dry-run app-only job records what it would call and ends skipped."""
    await rig.enqueue(app_id="app-1", dry_run=True)
    result, job = await rig.run()
    assert result is RunResult.SKIPPED
    assert job.error_code == "dry_run"
    assert [(a.action, a.code) for a in job.attempts] == [(APP_STATUS, "DryRun"), (ABORT, "DryRun")]
    assert rig.sae.calls == []


async def test_bug_in_a_run_retries_then_fails(rig: Rig) -> None:
    """An unexpected exception reschedules (reconciling); after max_attempts it fails."""
    rig.sae.then(DESCRIBE, RuntimeError("boom"), RuntimeError("boom again"))
    rig.settings["max_attempts"] = 2
    await rig.enqueue(change_order_id="co-1")
    with capture_logs() as logs:
        result, job = await rig.run()
        assert result is RunResult.RETRY
        assert job.error_code == "internal_error"
        assert job.needs_reconcile
        result, job = await _run_due(rig, job)
    assert result is RunResult.FAILED
    assert job.error_code == "internal_error"
    assert job.error_message == "RuntimeError: boom again"
    assert [e["event"] for e in logs].count("job_crashed") == 2


async def test_lost_lease_writes_nothing(rig: Rig) -> None:
    """A run whose lease was rescued meanwhile stops without touching the job."""
    await rig.enqueue(change_order_id="co-1")
    claimed = await rig.claim(lease_s=0.05)
    await asyncio.sleep(0.1)
    assert await rig.store.rescue_expired(10) == 1
    result, job = await rig.run(claimed)
    assert result is RunResult.LOST
    assert job.status is JobStatus.QUEUED
    assert job.attempts == ()
    assert job.needs_reconcile
    # The pre-check's row could not be written under the lost lease: no abort followed.
    assert rig.sae.calls == [(DESCRIBE, "co-1")]


async def test_drain_before_first_call_releases(rig: Rig) -> None:
    """A job claimed as the worker drains is given back untouched, due at once."""
    await rig.enqueue(change_order_id="co-1")
    rig.draining.set()
    result, job = await rig.run()
    assert result is RunResult.RELEASED
    assert job.status is JobStatus.QUEUED
    assert rig.sae.calls == []


async def test_cancel_mid_call_releases_for_reconcile(rig: Rig) -> None:
    """Cancelled while the abort is on the wire: released and marked for reconcile."""
    rig.sae.slow[ABORT] = 5.0
    await rig.enqueue(change_order_id="co-1")
    claimed = await rig.claim()
    task = asyncio.create_task(JobRun(rig.deps(), claimed).run())
    while rig.sae.count(ABORT) == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)  # the shielded release finishes
    job = await rig.store.get(claimed.job.id)
    assert job.status is JobStatus.WAITING
    assert job.needs_reconcile
    assert job.lease_token is None
    assert [a.action for a in job.attempts] == [DESCRIBE]  # the abort has no answer to record


async def test_calls_spend_budget_by_priority(rig: Rig) -> None:
    """First-run calls are FIRST, a retry run's are RETRY, verification polls are POLL."""
    rig.budget = CallBudget(LocalTokens(60000), 60000)
    rig.sae.then(ABORT, busy())
    job_id = await rig.enqueue(change_order_id="co-1")
    await rig.run()
    assert rig.budget.granted[Priority.FIRST] == 2
    await rig.run_until_settled(job_id)
    assert rig.budget.granted[Priority.RETRY] == 1
    assert rig.budget.granted[Priority.POLL] == 1


async def test_throttling_pauses_the_budget(rig: Rig) -> None:
    """A Throttling answer holds this process's calls for its retry-after."""
    rig.budget = CallBudget(LocalTokens(60000), 60000)
    rig.sae.then(ABORT, throttled(retry_after_s=0.3))
    await rig.enqueue(change_order_id="co-1")
    result, _job = await rig.run()
    assert result is RunResult.RETRY
    loop = asyncio.get_running_loop()
    started = loop.time()
    await rig.budget.acquire(Priority.FIRST)
    assert loop.time() - started >= 0.2


async def _rescue(rig: Rig) -> None:
    """Claim with a tiny lease, let it expire, rescue: an interrupted run."""
    await rig.claim(lease_s=0.01)
    await asyncio.sleep(0.03)
    assert await rig.store.rescue_expired(rig.settings["max_attempts"]) == 1


async def test_job_interrupted_max_attempts_times_is_failed_by_the_store(rig: Rig) -> None:
    """A job whose runs keep dying (poison) is failed by its max_attempts-th rescue, uncalled."""
    rig.settings["max_attempts"] = 3
    job_id = await rig.enqueue(change_order_id="co-1")
    for _ in range(3):
        await _rescue(rig)
    job = await rig.store.get(job_id)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "interrupted_too_often"
    assert job.interrupted_count == 3
    assert await rig.store.claim("w", 5.0, 1) == []
    assert rig.sae.calls == []


async def test_many_busy_retries_then_one_crash_still_completes(rig: Rig) -> None:
    """Claims from ordinary retries do not count as interruptions: one rescue is survived."""
    rig.settings["max_attempts"] = 3
    rig.sae.then(ABORT, busy(), busy(), busy(), busy())
    job_id = await rig.enqueue(change_order_id="co-1")
    for _ in range(4):
        job = await rig.store.get(job_id)
        await _run_due(rig, job)
    await asyncio.sleep(0.1)
    await _rescue(rig)
    job = await rig.store.get(job_id)
    assert job.attempt_count > 3
    job = await rig.run_until_settled(job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert rig.sae.accepted == ["co-1"]


async def test_retry_budget_counts_from_the_jobs_first_call_across_runs(rig: Rig) -> None:
    """max_elapsed_s runs from the stored first_attempt_at, not from this run's first call."""
    rig.policy = RetryPolicy(
        initial_s=0.01, max_interval_s=0.01, max_elapsed_s=0.3, wait=tenacity.wait_fixed(0.01)
    )
    rig.sae.then(ABORT, busy(), busy())
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.RETRY
    first = job.first_attempt_at
    assert first is not None
    assert first == job.attempts[0].started_at
    await asyncio.sleep(0.35)
    result, job = await rig.run()
    assert result is RunResult.FAILED
    assert job.error_code == "retry_budget_exhausted"
    assert job.first_attempt_at == first
    assert [a.action for a in job.attempts] == [DESCRIBE, ABORT, ABORT]


def _count_attempt_writes(store: Store) -> list[str]:
    """Record the action of every ``record_attempt`` call made on ``store`` from now on."""
    actions: list[str] = []
    real = store.record_attempt

    async def record_attempt(job_id: str, token: str, attempt: Any) -> int:
        actions.append(attempt.action)
        return await real(job_id, token, attempt)

    store.record_attempt = record_attempt  # type: ignore[method-assign]
    return actions


async def test_the_deciding_call_is_recorded_in_the_final_write(rig: Rig) -> None:
    """Pre-check alone, then the abort's row travels with the finish: one write fewer."""
    rig.settings["verify_enabled"] = False
    separate = _count_attempt_writes(rig.store)
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.SUCCEEDED
    assert separate == [DESCRIBE]
    assert [(a.number, a.action, a.outcome) for a in job.attempts] == [
        (1, DESCRIBE, AttemptOutcome.SUCCESS),
        (2, ABORT, AttemptOutcome.SUCCESS),
    ]
    assert job.first_attempt_at == job.attempts[0].started_at


async def test_verification_polls_are_on_record_before_each_pause(rig: Rig) -> None:
    """The abort's row comes with ``verifying``; each unfinished poll is written before a pause."""
    rig.sae.after_abort_status = 1
    separate = _count_attempt_writes(rig.store)
    job_id = await rig.enqueue(change_order_id="co-1")
    task = asyncio.create_task(rig.run())
    deadline = asyncio.get_running_loop().time() + 5
    while rig.sae.count(DESCRIBE) < 3:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.005)
    during = await rig.store.get(job_id)
    assert during.status is JobStatus.VERIFYING
    assert [a.action for a in during.attempts][:3] == [DESCRIBE, ABORT, DESCRIBE]
    rig.sae.status["co-1"] = 6
    result, job = await task
    assert result is RunResult.SUCCEEDED
    assert ABORT not in separate
    # the abort came with "verifying", the last (terminal) poll with "succeeded"
    assert len(job.attempts) == len(separate) + 2
    assert job.attempts[-1].action == DESCRIBE


async def test_open_breaker_puts_the_job_back_without_calling(rig: Rig) -> None:
    """SAE failing opened the breaker: the next run calls nothing and waits as circuit_open,
    due when the breaker will let a probe through."""
    rig.settings["breaker"] = CircuitBreaker(threshold=1, open_s=30.0)
    rig.sae.then(DESCRIBE, server_error(DESCRIBE))
    job_id = await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert (result, job.error_code) == (RunResult.RETRY, "ServiceUnavailable")
    await asyncio.sleep(0.1)  # the 5xx retry comes due
    before = datetime.now(UTC)
    result, job = await rig.run()
    assert result is RunResult.RETRY
    assert job.status is JobStatus.WAITING
    assert job.error_code == "circuit_open"
    assert "paused after 1 failures in a row" in (job.error_message or "")
    assert job.next_attempt_at is not None
    assert 25 < (job.next_attempt_at - before).total_seconds() <= 30
    assert rig.sae.count(DESCRIBE) == 1  # the second run made no call
    assert len(job.attempts) == 1
    assert sample(rig.metrics, "sae_rollback_retries_total", {"reason": "circuit_open"}) == 1
    assert job.id == job_id


async def test_open_breaker_past_the_retry_budget_fails_the_job(rig: Rig) -> None:
    """A breaker that stays open longer than the job's retry budget ends it, with the reason."""
    rig.settings["breaker"] = breaker = CircuitBreaker(threshold=1, open_s=120.0)
    breaker.permit().done(server_error())
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()  # max_elapsed_s is 60
    assert result is RunResult.FAILED
    assert job.error_code == "retry_budget_exhausted"
    assert "SAE calls are paused" in (job.error_message or "")
    assert rig.sae.count(DESCRIBE) == 0


async def test_verification_waits_out_an_open_breaker_in_place(rig: Rig) -> None:
    """The abort is accepted; polls fail until the breaker opens; the job keeps its lease,
    waits, probes, and succeeds (no second abort)."""
    rig.settings["breaker"] = CircuitBreaker(threshold=2, open_s=0.2)
    rig.sae.then(DESCRIBE, None, server_error(DESCRIBE), server_error(DESCRIBE))
    await rig.enqueue(change_order_id="co-1")
    result, job = await rig.run()
    assert result is RunResult.SUCCEEDED
    assert rig.sae.count(ABORT) == 1
    assert [(a.action, a.outcome) for a in job.attempts] == [
        (DESCRIBE, AttemptOutcome.SUCCESS),
        (ABORT, AttemptOutcome.SUCCESS),
        (DESCRIBE, AttemptOutcome.RETRY),
        (DESCRIBE, AttemptOutcome.RETRY),
        (DESCRIBE, AttemptOutcome.SUCCESS),
    ]

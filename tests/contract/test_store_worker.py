"""Contract: claim, lease fencing, transitions, targets, retries, release, rescue, budget."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.errors import InvalidTransition, JobNotFound, LeaseLost
from orchestrator.jobs import AttemptOutcome, AuditKind, JobStatus, rfc3339
from orchestrator.store import AppBusy, DuplicateTarget, Store
from tests.contract.engines import Engine
from tests.contract.helpers import attempt, claim_one, new_job

# -- claim -----------------------------------------------------------------------------------


async def test_claim_leases_the_job_and_counts_the_attempt_at_claim_time(store: Store) -> None:
    """A claim sets running, a fresh token, an expiry ``lease_s`` ahead and attempt_count+1."""
    job = (await store.enqueue(new_job("co-1"))).job
    before = datetime.now(UTC)
    c = await claim_one(store, owner="worker-7", lease_s=30)
    assert c.job.id == job.id
    assert c.job.status is JobStatus.RUNNING
    assert c.job.attempt_count == 1
    assert c.job.lease_owner == "worker-7"
    assert c.token
    assert c.job.lease_token == c.token
    assert c.job.next_attempt_at is None
    # the database clock (PostgreSQL) and ours agree within a few seconds on one host
    assert before + timedelta(seconds=25) < c.lease_expires_at < before + timedelta(seconds=35)
    events = await store.audit(job.id)
    assert (events[-1].event, events[-1].actor) == (AuditKind.CLAIMED, "worker-7")
    assert events[-1].detail["attempt"] == 1
    assert events[-1].detail["lease_expires_at"] == rfc3339(
        c.lease_expires_at
    )  # same text, any engine


async def test_claim_takes_the_oldest_due_job_first(store: Store) -> None:
    """Jobs come out in due order: a retry due earlier beats a job enqueued later."""
    ids = [(await store.enqueue(new_job(f"co-{i}", f"app-{i}"))).job.id for i in range(3)]
    first = await claim_one(store)
    assert first.job.id == ids[0]
    await store.schedule_retry(first.job.id, first.token, delay_s=0)  # due again, now
    order = [(await claim_one(store)).job.id for _ in range(3)]
    assert order == [ids[1], ids[2], ids[0]]


async def test_claim_returns_a_batch_in_due_order_up_to_the_limit(store: Store) -> None:
    """``limit`` bounds the batch; the batch itself is oldest first."""
    ids = [(await store.enqueue(new_job(f"co-{i}", f"app-{i}"))).job.id for i in range(5)]
    batch = await store.claim("w1", 30, 3)
    assert [c.job.id for c in batch] == ids[:3]
    assert len({c.token for c in batch}) == 3
    assert [c.job.id for c in await store.claim("w1", 30, 10)] == ids[3:]
    assert await store.claim("w1", 30, 10) == []


async def test_claim_never_runs_two_jobs_of_one_app(store: Store) -> None:
    """While a job of an app is running or verifying, no other job of that app is claimed."""
    a = (await store.enqueue(new_job("co-1", "app-1"))).job
    b = (await store.enqueue(new_job("co-2", "app-1"))).job
    other = (await store.enqueue(new_job("co-3", "app-2"))).job
    batch = await store.claim("w1", 30, 10)  # one per app, even inside one batch
    assert sorted(c.job.id for c in batch) == sorted([a.id, other.id])
    first = next(c for c in batch if c.job.id == a.id)
    await store.transition(first.job.id, first.token, JobStatus.VERIFYING)
    assert await store.claim("w2", 30, 10) == []
    await store.transition(first.job.id, first.token, JobStatus.SUCCEEDED)
    assert [c.job.id for c in await store.claim("w2", 30, 10)] == [b.id]


async def test_jobs_without_an_app_are_serialized_by_change_order_only(store: Store) -> None:
    """Change-order-only jobs have no app lock yet: several are claimed together."""
    for i in range(3):
        await store.enqueue(new_job(f"co-{i}", None))
    assert len(await store.claim("w1", 30, 10)) == 3


async def test_claim_skips_waiting_jobs_until_they_are_due(store: Store) -> None:
    """A job scheduled for later is not claimed before its ``next_attempt_at``."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    await store.schedule_retry(c.job.id, c.token, delay_s=0.4)
    assert await store.claim("w1", 30, 10) == []
    await asyncio.sleep(0.5)
    again = await claim_one(store)
    assert again.job.id == c.job.id
    assert again.job.attempt_count == 2


async def test_concurrent_claims_never_hand_out_a_job_twice(engine: Engine) -> None:
    """Claims racing from two store instances share out the jobs without overlap."""
    seed = await engine.opened()
    stores = [seed, await engine.opened()]
    try:
        for i in range(40):
            await seed.enqueue(new_job(f"co-{i}", f"app-{i}"))
        batches = await asyncio.gather(*(stores[i % 2].claim(f"w{i}", 30, 3) for i in range(20)))
        ids = [c.job.id for batch in batches for c in batch]
        assert len(ids) == len(set(ids)) == 40
    finally:
        for s in stores:
            await s.close()


# -- fencing ---------------------------------------------------------------------------------


async def test_a_stale_token_can_write_nothing(store: Store) -> None:
    """After rescue and re-claim every write with the old token is LeaseLost and changes nothing."""
    await store.enqueue(new_job("co-1", "app-1"))
    stale = await claim_one(store, owner="w-old", lease_s=0.05)
    await asyncio.sleep(0.15)
    assert await store.rescue_expired(max_interrupts=5) == 1
    fresh = await claim_one(store, owner="w-new")
    job_id = stale.job.id
    snapshot = await store.get(job_id)
    audit_before = await store.audit(job_id)

    writes = [
        store.heartbeat(job_id, stale.token, 30),
        store.record_attempt(job_id, stale.token, attempt(AttemptOutcome.SUCCESS)),
        store.set_target(job_id, stale.token, app_id="app-1"),
        store.transition(job_id, stale.token, JobStatus.SUCCEEDED),
        store.transition(job_id, stale.token, JobStatus.VERIFYING),
        store.schedule_retry(job_id, stale.token, delay_s=1),
        store.release(job_id, stale.token),
    ]
    for write in writes:
        with pytest.raises(LeaseLost):
            await write
    assert await store.get(job_id) == snapshot
    assert await store.audit(job_id) == audit_before
    assert snapshot.lease_token == fresh.token
    assert snapshot.call_count == 0
    # the current holder is unaffected
    assert await store.record_attempt(job_id, fresh.token, attempt()) == 1


async def test_a_current_token_still_writes_after_expiry_until_the_job_is_rescued(
    store: Store,
) -> None:
    """Expiry alone fences nothing: the holder may finish until rescue takes the job back."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store, lease_s=0.05)
    await asyncio.sleep(0.15)
    new_expiry = await store.heartbeat(c.job.id, c.token, 30)
    assert new_expiry > datetime.now(UTC) + timedelta(seconds=20)
    assert await store.rescue_expired(max_interrupts=5) == 0  # renewed: nothing to rescue
    done = await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    assert done.status is JobStatus.SUCCEEDED


async def test_writes_to_an_unknown_job_raise_job_not_found(store: Store) -> None:
    """A fenced write naming no job is JobNotFound, not LeaseLost."""
    for write in (
        store.heartbeat("nope", "t", 30),
        store.record_attempt("nope", "t", attempt()),
        store.transition("nope", "t", JobStatus.SUCCEEDED),
        store.schedule_retry("nope", "t", delay_s=1),
        store.release("nope", "t"),
        store.set_target("nope", "t", app_id="a"),
    ):
        with pytest.raises(JobNotFound):
            await write
    with pytest.raises(JobNotFound):
        await store.get("nope")
    with pytest.raises(JobNotFound):
        await store.audit("nope")


# -- attempts, transitions, targets ------------------------------------------------------------


async def test_record_attempt_numbers_calls_and_remembers_the_run(store: Store) -> None:
    """Attempts are numbered 1, 2, 3 across claims, each tagged with the claim it ran in."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    assert await store.record_attempt(c.job.id, c.token, attempt()) == 1
    assert await store.record_attempt(c.job.id, c.token, attempt()) == 2
    await store.schedule_retry(c.job.id, c.token, delay_s=0)
    c2 = await claim_one(store)
    started = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
    ok = attempt(
        AttemptOutcome.SUCCESS, http_status=200, code=None, started_at=started, duration_ms=7
    )
    assert await store.record_attempt(c2.job.id, c2.token, ok) == 3
    job = await store.get(c.job.id)
    assert [(a.number, a.run, a.outcome) for a in job.attempts] == [
        (1, 1, AttemptOutcome.RETRY),
        (2, 1, AttemptOutcome.RETRY),
        (3, 2, AttemptOutcome.SUCCESS),
    ]
    last = job.attempts[-1]
    assert (last.started_at, last.duration_ms, last.http_status, last.code) == (
        started,
        7,
        200,
        None,
    )
    assert (last.request_id, last.trace_id) == ("req-1", "trace-1")
    assert job.call_count == 3


async def test_verifying_keeps_the_lease_and_a_terminal_status_ends_it(store: Store) -> None:
    """running→verifying keeps the token; →succeeded sets finished_at and clears the lease."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store, owner="w1")
    verifying = await store.transition(c.job.id, c.token, JobStatus.VERIFYING)
    assert verifying.status is JobStatus.VERIFYING
    assert verifying.lease_token == c.token
    assert verifying.finished_at is None
    await store.heartbeat(c.job.id, c.token, 30)  # still leased
    done = await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    assert done.status is JobStatus.SUCCEEDED
    assert done.finished_at is not None
    assert done.lease_token is None
    assert done.lease_expires_at is None
    assert done.lease_owner == "w1"  # kept for forensics
    events = [(e.event, e.actor, e.detail) for e in await store.audit(c.job.id)][-2:]
    assert events == [
        (AuditKind.VERIFYING, "w1", {"status": "verifying"}),
        (AuditKind.FINISHED, "w1", {"status": "succeeded"}),
    ]
    with pytest.raises(LeaseLost):
        await store.heartbeat(c.job.id, c.token, 30)


async def test_failed_and_skipped_record_the_error(store: Store) -> None:
    """A terminal failure keeps its error code and message (the contract's ``error``)."""
    await store.enqueue(new_job("co-1", "app-1"))
    await store.enqueue(new_job("co-2", "app-2"))
    a, b = await store.claim("w1", 30, 2)
    failed = await store.transition(a.job.id, a.token, JobStatus.FAILED, "Forbidden", "no")
    skipped = await store.transition(b.job.id, b.token, JobStatus.SKIPPED, "NotRunning", "done")
    assert failed.to_dict()["error"] == {"code": "Forbidden", "message": "no"}
    assert (skipped.status, skipped.error_code) == (JobStatus.SKIPPED, "NotRunning")
    last = (await store.audit(a.job.id))[-1]
    assert last.detail == {"status": "failed", "error_code": "Forbidden", "error_message": "no"}


async def test_illegal_transitions_raise_invalid_transition(store: Store) -> None:
    """Only verifying/succeeded/failed/skipped, and only from a status that allows them."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    for target in (JobStatus.QUEUED, JobStatus.WAITING, JobStatus.RUNNING, JobStatus.CANCELLED):
        with pytest.raises(InvalidTransition):
            await store.transition(c.job.id, c.token, target)
    await store.transition(c.job.id, c.token, JobStatus.VERIFYING)
    with pytest.raises(InvalidTransition):
        await store.transition(c.job.id, c.token, JobStatus.SKIPPED)
    with pytest.raises(InvalidTransition):
        await store.transition(c.job.id, c.token, JobStatus.VERIFYING)
    assert (await store.get(c.job.id)).status is JobStatus.VERIFYING


async def test_set_target_fills_in_the_resolved_change_order(store: Store) -> None:
    """An app-only job learns its change order; a change-order-only job learns its app."""
    await store.enqueue(new_job(None, "app-1"))
    await store.enqueue(new_job("co-2", None))
    a, b = await store.claim("w1", 30, 2)
    app_only, co_only = (a, b) if a.job.change_order_id is None else (b, a)
    resolved = await store.set_target(app_only.job.id, app_only.token, change_order_id="co-1")
    assert (resolved.change_order_id, resolved.app_id) == ("co-1", "app-1")
    learned = await store.set_target(co_only.job.id, co_only.token, app_id="app-2")
    assert (learned.change_order_id, learned.app_id) == ("co-2", "app-2")
    # now a request for co-1 is a duplicate of the resolved job
    dup = await store.enqueue(new_job("co-1", "app-1"))
    assert dup.deduplicated
    assert dup.job.id == app_only.job.id
    events = [(e.event, e.detail) for e in await store.audit(app_only.job.id)]
    assert events[-2:] == [
        (AuditKind.TARGET_SET, {"change_order_id": "co-1", "app_id": "app-1"}),
        (AuditKind.DEDUPLICATED, events[-1][1]),
    ]


async def test_set_target_to_a_change_order_with_a_live_job_raises_duplicate_target(
    store: Store,
) -> None:
    """Resolving to a change order another live job has is DuplicateTarget, naming that job."""
    other = (await store.enqueue(new_job("co-1", None))).job
    await store.enqueue(new_job(None, "app-1"))
    batch = await store.claim("w1", 30, 2)
    app_only = next(c for c in batch if c.job.id != other.id)
    with pytest.raises(DuplicateTarget) as info:
        await store.set_target(app_only.job.id, app_only.token, change_order_id="co-1")
    assert info.value.existing_job_id == other.id
    assert (await store.get(app_only.job.id)).change_order_id is None


async def test_set_target_to_a_busy_app_raises_app_busy(store: Store) -> None:
    """Learning an app that another job is running is AppBusy (the worker retries later)."""
    await store.enqueue(new_job("co-1", "app-1"))
    await store.enqueue(new_job("co-2", None))
    batch = await store.claim("w1", 30, 2)
    running = next(c for c in batch if c.job.app_id == "app-1")
    co_only = next(c for c in batch if c.job.app_id is None)
    with pytest.raises(AppBusy) as info:
        await store.set_target(co_only.job.id, co_only.token, app_id="app-1")
    assert info.value.running_job_id == running.job.id
    assert (await store.get(co_only.job.id)).app_id is None


async def test_set_target_never_changes_a_known_target(store: Store) -> None:
    """Filling is allowed, overwriting a different known value is InvalidTransition."""
    await store.enqueue(new_job("co-1", "app-1"))
    c = await claim_one(store)
    same = await store.set_target(c.job.id, c.token, change_order_id="co-1", app_id="app-1")
    assert (same.change_order_id, same.app_id) == ("co-1", "app-1")
    with pytest.raises(InvalidTransition):
        await store.set_target(c.job.id, c.token, change_order_id="co-9")
    with pytest.raises(InvalidTransition):
        await store.set_target(c.job.id, c.token, app_id="app-9")


# -- retry, release, rescue ------------------------------------------------------------------


async def test_schedule_retry_waits_keeps_the_error_and_frees_the_app(store: Store) -> None:
    """A retry ends the lease, records the error, sets next_attempt_at, and audits ``retried``."""
    await store.enqueue(new_job("co-1", "app-1"))
    await store.enqueue(new_job("co-2", "app-1"))
    c = await claim_one(store, owner="w1")
    before = datetime.now(UTC)
    job = await store.schedule_retry(
        c.job.id, c.token, delay_s=60, error_code="Busy", error_message="try later", reconcile=True
    )
    assert job.status is JobStatus.WAITING
    assert job.lease_token is None
    assert job.next_attempt_at is not None
    assert before + timedelta(seconds=55) < job.next_attempt_at < before + timedelta(seconds=65)
    assert (job.error_code, job.error_message, job.needs_reconcile) == ("Busy", "try later", True)
    last = (await store.audit(c.job.id))[-1]
    assert (last.event, last.actor, last.detail["error_code"]) == (AuditKind.RETRIED, "w1", "Busy")
    # the app is free again: its other job can run meanwhile
    assert (await claim_one(store)).job.change_order_id == "co-2"


async def test_schedule_retry_at_an_absolute_time(store: Store) -> None:
    """``at`` schedules for an exact moment; exactly one of ``at``/``delay_s`` is required."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    when = datetime(2099, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="exactly one"):
        await store.schedule_retry(c.job.id, c.token)
    job = await store.schedule_retry(c.job.id, c.token, at=when)
    assert job.next_attempt_at == when
    assert await store.claim("w1", 30, 1) == []


async def test_release_puts_the_job_back_due_now(store: Store) -> None:
    """Release (drain) ends the lease: queued if SAE was never called, else waiting; audited."""
    await store.enqueue(new_job("co-1", "app-1"))
    await store.enqueue(new_job("co-2", "app-2"))
    a, b = await store.claim("w1", 30, 2)
    await store.record_attempt(b.job.id, b.token, attempt())
    ra = await store.release(a.job.id, a.token)
    rb = await store.release(b.job.id, b.token, reconcile=True)
    assert (ra.status, ra.lease_token, ra.needs_reconcile) == (JobStatus.QUEUED, None, False)
    assert (rb.status, rb.needs_reconcile) == (JobStatus.WAITING, True)
    assert (await store.audit(a.job.id))[-1].event is AuditKind.RELEASED
    again = await store.claim("w2", 30, 2)
    assert sorted(c.job.id for c in again) == sorted([a.job.id, b.job.id])
    assert {c.job.attempt_count for c in again} == {2}


async def test_rescue_takes_back_expired_leases_and_flags_reconcile(store: Store) -> None:
    """An expired running/verifying job is due again with needs_reconcile; live leases stay."""
    await store.enqueue(new_job("co-1", "app-1"))
    await store.enqueue(new_job("co-2", "app-2"))
    await store.enqueue(new_job("co-3", "app-3"))
    expired_running = await claim_one(store, owner="dead-1", lease_s=0.05)
    expired_verifying = await claim_one(store, owner="dead-2", lease_s=0.05)
    await store.record_attempt(expired_verifying.job.id, expired_verifying.token, attempt())
    await store.transition(expired_verifying.job.id, expired_verifying.token, JobStatus.VERIFYING)
    alive = await claim_one(store, owner="alive", lease_s=30)
    await asyncio.sleep(0.15)

    assert await store.rescue_expired(max_interrupts=5) == 2
    r1 = await store.get(expired_running.job.id)
    r2 = await store.get(expired_verifying.job.id)
    assert (r1.status, r1.needs_reconcile, r1.lease_token) == (JobStatus.QUEUED, True, None)
    assert (r2.status, r2.needs_reconcile) == (JobStatus.WAITING, True)
    assert r1.error_code == "lease_expired"
    assert "dead-1" in (r1.error_message or "")
    assert (await store.get(alive.job.id)).status is JobStatus.RUNNING
    rescued = (await store.audit(r2.id))[-1]
    assert (rescued.event, rescued.actor) == (AuditKind.RESCUED, "dead-2")
    assert rescued.detail["from"] == "verifying"
    assert await store.rescue_expired(max_interrupts=5) == 0
    again = await store.claim("w", 30, 5)
    assert sorted(c.job.id for c in again) == sorted([r1.id, r2.id])
    assert all(c.job.needs_reconcile for c in again)


async def test_rescue_fails_a_job_interrupted_max_interrupts_times(store: Store) -> None:
    """A job that lost its worker on each of ``max_interrupts`` runs ends failed, audited."""
    job = (await store.enqueue(new_job("co-1"))).job
    for n in range(1, 4):
        await claim_one(store, owner=f"dead-{n}", lease_s=0.05)
        await asyncio.sleep(0.1)
        assert await store.rescue_expired(max_interrupts=3) == 1
        assert (await store.get(job.id)).interrupted_count == n
    final = await store.get(job.id)
    assert final.status is JobStatus.FAILED
    assert (final.attempt_count, final.interrupted_count) == (3, 3)
    assert final.finished_at is not None
    assert final.lease_token is None
    assert final.next_attempt_at is None
    assert final.error_code == "interrupted_too_often"
    assert (final.error_message or "").startswith("gave up after 3 interrupted runs")
    last = (await store.audit(job.id))[-1]
    assert (last.event, last.actor) == (AuditKind.RESCUED, "dead-3")
    assert last.detail["status"] == "failed"
    assert last.detail["interrupted_count"] == 3
    assert last.detail["error_code"] == "interrupted_too_often"
    assert await store.claim("w", 30, 1) == []


async def test_ordinary_retries_do_not_count_as_interruptions(store: Store) -> None:
    """Claims ended by schedule_retry/release/transition leave interrupted_count alone."""
    job = (await store.enqueue(new_job("co-1"))).job
    for _ in range(5):  # five busy probes: five claims, no interruption
        c = await claim_one(store)
        await store.schedule_retry(c.job.id, c.token, delay_s=0, attempt=attempt())
    c = await claim_one(store)
    await store.release(c.job.id, c.token)
    after = await store.get(job.id)
    assert (after.attempt_count, after.interrupted_count) == (6, 0)
    # one crash now is survived even with a limit of 2, although 7 claims were made
    await claim_one(store, lease_s=0.05)
    await asyncio.sleep(0.1)
    assert await store.rescue_expired(max_interrupts=2) == 1
    rescued = await store.get(job.id)
    assert (rescued.status, rescued.interrupted_count) == (JobStatus.WAITING, 1)
    assert rescued.error_code == "lease_expired"
    c = await claim_one(store)
    assert c.job.interrupted_count == 1
    done = await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    assert (done.status, done.interrupted_count) == (JobStatus.SUCCEEDED, 1)


async def test_rescue_rejects_a_limit_below_one(store: Store) -> None:
    """``max_interrupts`` must be at least 1 (a caller bug otherwise, nothing is written)."""
    with pytest.raises(ValueError, match="max_interrupts"):
        await store.rescue_expired(0)


async def test_first_attempt_at_is_the_start_of_the_first_recorded_call(store: Store) -> None:
    """Every path that records a call sets first_attempt_at once; later calls keep it."""
    t0 = datetime(2030, 1, 1, 12, 0, 0, 250000, tzinfo=UTC)
    jobs = [(await store.enqueue(new_job(f"co-{i}", f"app-{i}"))).job for i in range(4)]
    assert all(j.first_attempt_at is None for j in jobs)
    claimed = {c.job.id: c for c in await store.claim("w1", 30, 4)}
    a, b, c, d = (claimed[j.id] for j in jobs)
    # record_attempt, then a later call: the first stays
    await store.record_attempt(a.job.id, a.token, attempt(started_at=t0))
    await store.record_attempt(a.job.id, a.token, attempt(started_at=t0 + timedelta(seconds=9)))
    # schedule_retry / transition with the deciding call, each the job's first call
    await store.schedule_retry(b.job.id, b.token, delay_s=0, attempt=attempt(started_at=t0))
    success = attempt(AttemptOutcome.SUCCESS, started_at=t0)
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED, attempt=success)
    # a transition without an attempt records no call and sets nothing
    await store.transition(d.job.id, d.token, JobStatus.SKIPPED, "x", "y")
    got = [await store.get(j.id) for j in jobs]
    assert [g.first_attempt_at for g in got] == [t0, t0, t0, None]
    assert [g.call_count for g in got] == [2, 1, 1, 0]
    # the next run (a new claim) sees it, and its own calls do not move it
    again = await claim_one(store, owner="w2")
    assert (again.job.id, again.job.first_attempt_at) == (b.job.id, t0)
    later = attempt(started_at=t0 + timedelta(seconds=30))
    await store.schedule_retry(again.job.id, again.token, delay_s=60, attempt=later)
    assert (await store.get(b.job.id)).first_attempt_at == t0


# -- shared call budget ------------------------------------------------------------------------


async def test_call_budget_grants_the_burst_then_says_how_long_to_wait(store: Store) -> None:
    """A bucket of 3 at 60/min grants 3 calls, then asks to wait about one second."""
    assert [await store.take_call_tokens("sae", 60, 3) for _ in range(3)] == [0, 0, 0]
    wait = await store.take_call_tokens("sae", 60, 3)
    assert 0.5 < wait <= 1.0
    assert await store.take_call_tokens("other", 60, 3) == 0  # buckets are independent


async def test_call_budget_refills_with_time(store: Store) -> None:
    """At 600/min a token comes back every 0.1 s; an empty bucket grants again after that."""
    assert await store.take_call_tokens("sae", 600, 1) == 0
    assert await store.take_call_tokens("sae", 600, 1) > 0
    await asyncio.sleep(0.15)
    assert await store.take_call_tokens("sae", 600, 1) == 0


async def test_call_budget_is_shared_between_store_instances(engine: Engine) -> None:
    """Two processes' stores on one database draw from one bucket."""
    a, b = await engine.opened(), await engine.opened()
    try:
        grants = await asyncio.gather(*(s.take_call_tokens("sae", 1, 5) for s in (a, b) * 5))
        assert sum(1 for g in grants if g == 0) == 5
    finally:
        await a.close()
        await b.close()


async def test_call_budget_rejects_requests_that_can_never_be_granted(store: Store) -> None:
    """Asking for more than the bucket holds, or a non-positive rate, is a caller bug."""
    with pytest.raises(ValueError, match="never grantable"):
        await store.take_call_tokens("sae", 60, 1, n=2)
    with pytest.raises(ValueError, match="rate_per_minute"):
        await store.take_call_tokens("sae", 0, 1)


# -- wake-ups --------------------------------------------------------------------------------


async def test_wait_for_work_times_out_when_nothing_is_due(store: Store) -> None:
    """With nothing to claim it returns False after about ``timeout_s``."""
    start = time.monotonic()
    assert await store.wait_for_work(0.3) is False
    assert 0.25 < time.monotonic() - start < 2


async def test_wait_for_work_returns_at_once_when_work_is_due(store: Store) -> None:
    """A due job means no waiting at all."""
    await store.enqueue(new_job("co-1"))
    start = time.monotonic()
    assert await store.wait_for_work(10) is True
    assert time.monotonic() - start < 1


async def test_wait_for_work_wakes_on_enqueue(store: Store) -> None:
    """An enqueue wakes a waiting worker well before its timeout (NOTIFY / in-process event)."""
    waiter = asyncio.ensure_future(store.wait_for_work(20))
    await asyncio.sleep(0.3)  # let it start waiting (and LISTEN)
    start = time.monotonic()
    await store.enqueue(new_job("co-1"))
    assert await asyncio.wait_for(waiter, 5) is True
    assert time.monotonic() - start < 2


async def test_wait_for_work_wakes_when_a_retry_comes_due(store: Store) -> None:
    """A waiting job's due time bounds the sleep: no notification is needed."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    await store.schedule_retry(c.job.id, c.token, delay_s=0.4)
    start = time.monotonic()
    assert await store.wait_for_work(20) is True
    assert 0.2 < time.monotonic() - start < 3
    assert (await claim_one(store)).job.id == c.job.id


async def test_wait_for_work_ignores_jobs_blocked_by_a_busy_app(store: Store) -> None:
    """A due job whose app is busy does not wake the worker (no busy loop); finishing does."""
    await store.enqueue(new_job("co-1", "app-1"))
    await store.enqueue(new_job("co-2", "app-1"))
    c = await claim_one(store)
    start = time.monotonic()
    assert await store.wait_for_work(0.3) is False
    assert time.monotonic() - start > 0.25
    waiter = asyncio.ensure_future(store.wait_for_work(20))
    await asyncio.sleep(0.3)
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    assert await asyncio.wait_for(waiter, 5) is True


# -- an attempt together with its outcome ----------------------------------------------------


async def test_transition_can_record_the_deciding_attempt_in_the_same_commit(
    store: Store,
) -> None:
    """``transition(..., attempt=)`` stores the call and the new status together."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    await store.record_attempt(c.job.id, c.token, attempt())
    ok = attempt(AttemptOutcome.SUCCESS, http_status=200, code=None)
    done = await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED, attempt=ok)
    assert done.call_count == 2
    job = await store.get(c.job.id)
    assert [(a.number, a.outcome) for a in job.attempts] == [
        (1, AttemptOutcome.RETRY),
        (2, AttemptOutcome.SUCCESS),
    ]


async def test_a_refused_transition_does_not_keep_its_attempt(store: Store) -> None:
    """When the transition is refused (illegal or stale lease) its attempt is not stored."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    await store.transition(c.job.id, c.token, JobStatus.VERIFYING)
    with pytest.raises(InvalidTransition):
        await store.transition(c.job.id, c.token, JobStatus.SKIPPED, attempt=attempt())
    with pytest.raises(LeaseLost):
        await store.transition(c.job.id, "stale", JobStatus.SUCCEEDED, attempt=attempt())
    job = await store.get(c.job.id)
    assert (job.attempts, job.call_count, job.status) == ((), 0, JobStatus.VERIFYING)


async def test_schedule_retry_can_record_the_failed_attempt(store: Store) -> None:
    """``schedule_retry(..., attempt=)`` stores the busy answer with the retry decision."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    waiting = await store.schedule_retry(
        c.job.id, c.token, delay_s=30, error_code="Busy", attempt=attempt()
    )
    assert waiting.call_count == 1
    job = await store.get(c.job.id)
    assert [(a.number, a.run, a.code) for a in job.attempts] == [
        (1, 1, "Application.ChangerOrderRunning")
    ]


# -- many writers at once (group commit) -------------------------------------------------------


async def test_a_burst_of_writes_gives_each_caller_its_own_outcome(store: Store) -> None:
    """Concurrent finishes share commits, but a stale or illegal one fails alone."""
    for i in range(30):
        await store.enqueue(new_job(f"co-{i}", f"app-{i}"))
    claimed = await store.claim("w1", 30, 30)
    assert len(claimed) == 30
    verifying = claimed[20]
    await store.transition(verifying.job.id, verifying.token, JobStatus.VERIFYING)

    calls = []
    for i, c in enumerate(claimed):
        if i < 10:  # stale token: LeaseLost
            calls.append(store.transition(c.job.id, "stale", JobStatus.SUCCEEDED))
        elif i == 20:  # verifying -> skipped is not allowed: InvalidTransition
            calls.append(store.transition(c.job.id, c.token, JobStatus.SKIPPED))
        else:
            calls.append(
                store.transition(c.job.id, c.token, JobStatus.SUCCEEDED, attempt=attempt())
            )
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, LeaseLost) for o in outcomes[:10])
    assert isinstance(outcomes[20], InvalidTransition)
    done = [o for i, o in enumerate(outcomes) if i >= 10 and i != 20]
    assert all(not isinstance(o, BaseException) and o.status is JobStatus.SUCCEEDED for o in done)
    stats = await store.stats()
    assert stats.counts[JobStatus.SUCCEEDED] == 19
    assert stats.counts[JobStatus.RUNNING] == 10
    assert stats.counts[JobStatus.VERIFYING] == 1


async def test_concurrent_attempts_of_one_job_all_get_their_own_number(store: Store) -> None:
    """Simultaneous record_attempt calls for one job are all stored, numbered 1..n."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    numbers = await asyncio.gather(
        *(store.record_attempt(c.job.id, c.token, attempt(message=f"m{i}")) for i in range(5))
    )
    assert sorted(numbers) == [1, 2, 3, 4, 5]
    job = await store.get(c.job.id)
    assert sorted(a.message or "" for a in job.attempts) == [f"m{i}" for i in range(5)]

"""Contract: enqueue, dedupe, idempotency keys, rejections and cancel — on every engine."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.errors import InvalidTransition, JobNotFound
from orchestrator.jobs import AuditKind, JobStatus
from orchestrator.store import Store
from tests.contract.engines import Engine
from tests.contract.helpers import attempt, claim_one, new_job


async def test_enqueue_creates_a_queued_due_job_and_audits_it(store: Store) -> None:
    """A new request becomes a committed queued job, due now, with an ``accepted`` audit row."""
    result = await store.enqueue(
        new_job("co-a", "app-a", reason="error rate", requested_by="alice", dry_run=True)
    )
    assert not result.deduplicated
    job = await store.get(result.job.id)
    assert job == result.job
    assert job.status is JobStatus.QUEUED
    assert (job.change_order_id, job.app_id, job.reason, job.requested_by, job.dry_run) == (
        "co-a",
        "app-a",
        "error rate",
        "alice",
        True,
    )
    assert job.next_attempt_at is not None
    assert job.finished_at is None
    assert job.attempt_count == 0
    assert job.lease_token is None
    events = await store.audit(job.id)
    assert [(e.event, e.actor) for e in events] == [(AuditKind.ACCEPTED, "api")]
    assert events[0].detail["change_order_id"] == "co-a"


async def test_enqueue_of_a_live_change_order_returns_the_existing_job(store: Store) -> None:
    """While a job for a change order is live, a second request returns it, deduplicated."""
    first = await store.enqueue(new_job("co-1", "app-1"))
    claimed = await claim_one(store)  # live in every status: queued, then running
    second = await store.enqueue(new_job("co-1", "app-1", source="alertmanager"))
    assert second.deduplicated
    assert second.job.id == first.job.id == claimed.job.id
    assert second.job.status is JobStatus.RUNNING
    events = [(e.event, e.actor) for e in await store.audit(first.job.id)]
    assert (AuditKind.DEDUPLICATED, "alertmanager") in events


async def test_enqueue_after_the_job_finished_creates_a_new_job(store: Store) -> None:
    """Dedupe only covers live jobs: once finished, the same change order can run again."""
    first = await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    await store.transition(c.job.id, c.token, JobStatus.FAILED, "Boom", "no")
    again = await store.enqueue(new_job("co-1"))
    assert not again.deduplicated
    assert again.job.id != first.job.id


async def test_app_only_requests_deduplicate_per_app(store: Store) -> None:
    """At most one live app-only job per app; a change-order job of that app is separate."""
    a = await store.enqueue(new_job(None, "app-x"))
    b = await store.enqueue(new_job(None, "app-x"))
    c = await store.enqueue(new_job("co-x", "app-x"))
    d = await store.enqueue(new_job(None, "app-y"))
    assert b.deduplicated
    assert b.job.id == a.job.id
    assert not c.deduplicated
    assert c.job.id != a.job.id
    assert not d.deduplicated


async def test_concurrent_enqueues_of_one_change_order_make_one_job(engine: Engine) -> None:
    """20 simultaneous requests (two store instances, many connections) create one job."""
    stores = [await engine.opened(), await engine.opened()]
    try:
        results = await asyncio.gather(
            *(stores[i % 2].enqueue(new_job("co-race", "app-race")) for i in range(20))
        )
        ids = {r.job.id for r in results}
        assert len(ids) == 1
        assert sum(not r.deduplicated for r in results) == 1
        page = await stores[0].list_jobs(limit=100)
        assert [j.id for j in page.items] == list(ids)
        events = [e.event for e in await stores[0].audit(ids.pop())]
        assert events.count(AuditKind.ACCEPTED) == 1
        assert events.count(AuditKind.DEDUPLICATED) == 19
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_replays_of_one_idempotency_key_make_one_job(engine: Engine) -> None:
    """Simultaneous requests with one key but different change orders still map to one job."""
    stores = [await engine.opened(), await engine.opened()]
    try:
        results = await asyncio.gather(
            *(
                stores[i % 2].enqueue(new_job(f"co-{i}", f"app-{i}", idempotency_key="fp:1"))
                for i in range(10)
            )
        )
        assert len({r.job.id for r in results}) == 1
        assert sum(not r.deduplicated for r in results) == 1
        assert len((await stores[0].list_jobs(limit=100)).items) == 1
    finally:
        for s in stores:
            await s.close()


async def test_idempotency_key_replay_returns_the_same_job_even_after_it_finished(
    store: Store,
) -> None:
    """A replayed key returns its job whatever happened since, without a new rollback."""
    first = await store.enqueue(new_job("co-1", idempotency_key="fp1@2024-01-01T00:00:00Z"))
    c = await claim_one(store)
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    replay = await store.enqueue(new_job("co-1", idempotency_key="fp1@2024-01-01T00:00:00Z"))
    assert replay.deduplicated
    assert replay.job.id == first.job.id
    assert replay.job.status is JobStatus.SUCCEEDED
    assert len((await store.list_jobs()).items) == 1


async def test_idempotency_keys_are_scoped_by_source(store: Store) -> None:
    """The same key from two sources is two requests."""
    a = await store.enqueue(new_job("co-1", "app-1", source="alertmanager", idempotency_key="k"))
    b = await store.enqueue(new_job("co-2", "app-2", source="grafana", idempotency_key="k"))
    assert not a.deduplicated
    assert not b.deduplicated
    assert a.job.id != b.job.id


async def test_a_deduplicated_requests_key_keeps_mapping_to_the_live_job(store: Store) -> None:
    """A second alert folded into a live job replays to that job even after it finished."""
    first = await store.enqueue(new_job("co-1", idempotency_key="alert-A"))
    folded = await store.enqueue(new_job("co-1", idempotency_key="alert-B"))
    assert folded.deduplicated
    assert folded.job.id == first.job.id
    c = await claim_one(store)
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    replay = await store.enqueue(new_job("co-1", idempotency_key="alert-B"))
    assert replay.deduplicated
    assert replay.job.id == first.job.id


async def test_record_rejection_writes_a_jobless_audit_row(store: Store) -> None:
    """A refused request leaves a ``rejected`` audit row with who, why and the detail."""
    await store.record_rejection("grafana", "app not allowed", {"app_id": "app-9"})
    await store.record_rejection("api", "app not allowed", {"app_id": "app-8"})
    rows = await store.rejections(limit=10)
    assert [(r.event, r.actor, r.job_id) for r in rows] == [
        (AuditKind.REJECTED, "api", None),
        (AuditKind.REJECTED, "grafana", None),
    ]
    assert rows[1].detail == {"app_id": "app-9", "reason": "app not allowed"}


async def test_cancel_queued_and_waiting_jobs(store: Store) -> None:
    """Queued and waiting jobs can be cancelled; the reason is kept and audited."""
    queued = (await store.enqueue(new_job("co-1", "app-1"))).job
    await store.enqueue(new_job("co-2", "app-2"))
    c = await store.claim("w1", 30, 10)
    waiting = next(x for x in c if x.job.change_order_id == "co-2")
    running = next(x for x in c if x.job.change_order_id == "co-1")
    await store.schedule_retry(
        waiting.job.id,
        waiting.token,
        delay_s=60,
        attempt=attempt(code="Application.ChangerOrderRunning"),
    )
    await store.release(running.job.id, running.token)

    for job_id in (queued.id, waiting.job.id):
        before = await store.get(job_id)
        cancelled = await store.cancel(job_id, "resolved", "bob")
        # The answer is the whole job, attempts included (what the API returns).
        assert cancelled.attempts == before.attempts
        assert len(cancelled.attempts) == (1 if job_id == waiting.job.id else 0)
        assert cancelled.status is JobStatus.CANCELLED
        assert cancelled.finished_at is not None
        assert cancelled.next_attempt_at is None
        assert cancelled.error_message == "resolved"
        last = (await store.audit(job_id))[-1]
        assert (last.event, last.actor, last.detail) == (
            AuditKind.CANCELLED,
            "bob",
            {"reason": "resolved"},
        )
    assert await store.claim("w1", 30, 10) == []


async def test_cancel_is_refused_once_a_worker_holds_the_job_or_it_finished(store: Store) -> None:
    """Running, verifying and terminal jobs cannot be cancelled; unknown ids are not found."""
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store)
    with pytest.raises(InvalidTransition):
        await store.cancel(c.job.id, "x", "bob")
    await store.transition(c.job.id, c.token, JobStatus.VERIFYING)
    with pytest.raises(InvalidTransition):
        await store.cancel(c.job.id, "x", "bob")
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    with pytest.raises(InvalidTransition):
        await store.cancel(c.job.id, "x", "bob")
    assert (await store.get(c.job.id)).status is JobStatus.SUCCEEDED
    with pytest.raises(JobNotFound):
        await store.cancel("no-such-job", "x", "bob")


async def test_cancel_by_idempotency_key_cancels_the_keyed_job(store: Store) -> None:
    """ "Alert resolved" finds the job by the alert's key; an unknown key is a no-op."""
    job = (await store.enqueue(new_job("co-1", source="alertmanager", idempotency_key="fp"))).job
    assert await store.cancel_by_idempotency_key("grafana", "fp", "resolved", "am") is None
    assert await store.cancel_by_idempotency_key("alertmanager", "nope", "resolved", "am") is None
    cancelled = await store.cancel_by_idempotency_key("alertmanager", "fp", "resolved", "am")
    assert cancelled is not None
    assert cancelled.id == job.id
    assert cancelled.status is JobStatus.CANCELLED

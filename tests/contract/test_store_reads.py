"""Contract: get, list pagination, stats, the audit trail and pruning — on every engine."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.errors import JobNotFound
from orchestrator.jobs import AttemptOutcome, AuditKind, JobStatus
from orchestrator.store import InvalidCursor, Store
from tests.contract.helpers import attempt, claim_one, new_job


async def test_get_returns_the_job_in_the_contract_shape_with_its_attempts(store: Store) -> None:
    """``to_dict`` of a stored job has exactly the contract's keys, attempts in order."""
    await store.enqueue(new_job("co-1", "app-1", reason="5xx", requested_by="am"))
    c = await claim_one(store)
    await store.record_attempt(c.job.id, c.token, attempt())
    await store.record_attempt(c.job.id, c.token, attempt(AttemptOutcome.SUCCESS, code=None))
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    data = (await store.get(c.job.id)).to_dict()
    assert set(data) == {
        "id", "change_order_id", "app_id", "region", "status", "source", "reason",
        "requested_by", "dry_run", "created_at", "updated_at", "finished_at",
        "next_attempt_at", "error", "attempts",
    }  # fmt: skip
    assert data["status"] == "succeeded"
    assert data["finished_at"].endswith("Z")
    assert [a["number"] for a in data["attempts"]] == [1, 2]
    assert [a["outcome"] for a in data["attempts"]] == ["retry", "success"]
    assert data["attempts"][0]["code"] == "Application.ChangerOrderRunning"


async def test_list_walks_every_page_without_duplicates_or_gaps(store: Store) -> None:
    """Keyset pages, newest first, cover every job exactly once, even with inserts meanwhile."""
    ids = [(await store.enqueue(new_job(f"co-{i}", f"app-{i}"))).job.id for i in range(23)]
    seen: list[str] = []
    cursor: str | None = None
    for page_number in range(10):
        page = await store.list_jobs(limit=5, cursor=cursor)
        seen.extend(j.id for j in page.items)
        if page_number == 1:  # a newer job does not shift the pages being walked
            await store.enqueue(new_job("co-late", "app-late"))
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    full = await store.list_jobs(limit=23)
    assert len(full.items) == 23
    assert full.next_cursor is not None


async def test_list_filters_by_status_app_and_source(store: Store) -> None:
    """Filters combine; each page still carries the jobs' attempts."""
    await store.enqueue(new_job("co-1", "app-1", source="alertmanager"))
    await store.enqueue(new_job("co-2", "app-2", source="api"))
    await store.enqueue(new_job("co-3", "app-1", source="api"))
    c = await claim_one(store)  # co-1 (oldest)
    await store.record_attempt(c.job.id, c.token, attempt())
    running = await store.list_jobs(status=JobStatus.RUNNING)
    assert [j.change_order_id for j in running.items] == ["co-1"]
    assert len(running.items[0].attempts) == 1
    by_app = await store.list_jobs(app_id="app-1")
    assert [j.change_order_id for j in by_app.items] == ["co-3", "co-1"]
    both = await store.list_jobs(app_id="app-1", source="api", status=JobStatus.QUEUED)
    assert [j.change_order_id for j in both.items] == ["co-3"]
    assert (await store.list_jobs(source="grafana")).items == ()


async def test_a_malformed_cursor_is_refused(store: Store) -> None:
    """Garbage cursors raise InvalidCursor (a ValueError: intake answers 400)."""
    for bad in ("not-base64!!", "aGVsbG8", "ajE6eA", ""):
        with pytest.raises(InvalidCursor):
            await store.list_jobs(cursor=bad)
    with pytest.raises(ValueError, match="limit"):
        await store.list_jobs(limit=0)


async def test_stats_count_every_status_and_the_oldest_due_age(store: Store) -> None:
    """Counts include zeros; the age is that of the oldest due unclaimed job."""
    empty = await store.stats()
    assert set(empty.counts) == set(JobStatus)
    assert sum(empty.counts.values()) == 0
    assert empty.oldest_queued_age_s == 0
    await store.enqueue(new_job("co-1", "app-1"))
    await asyncio.sleep(0.3)
    await store.enqueue(new_job("co-2", "app-2"))
    await store.enqueue(new_job("co-3", "app-3"))
    stats = await store.stats()
    assert stats.counts[JobStatus.QUEUED] == 3
    assert 0.25 < stats.oldest_queued_age_s < 5
    c = await claim_one(store)  # the oldest one
    await store.transition(c.job.id, c.token, JobStatus.FAILED, "x", "y")
    c2 = await claim_one(store)
    await store.schedule_retry(c2.job.id, c2.token, delay_s=60)  # waiting, not due: not counted
    stats = await store.stats()
    assert (stats.counts[JobStatus.QUEUED], stats.counts[JobStatus.FAILED]) == (1, 1)
    assert stats.counts[JobStatus.WAITING] == 1
    assert stats.oldest_queued_age_s < 0.25


async def test_the_audit_trail_records_every_decision_in_order(store: Store) -> None:
    """accepted → deduplicated → claimed → retried → claimed → verifying → finished."""
    job = (await store.enqueue(new_job("co-1"))).job
    await store.enqueue(new_job("co-1"))
    c = await claim_one(store, owner="w1")
    await store.schedule_retry(c.job.id, c.token, delay_s=0, error_code="Busy")
    c = await claim_one(store, owner="w2")
    await store.transition(c.job.id, c.token, JobStatus.VERIFYING)
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    events = await store.audit(job.id)
    assert [(e.event, e.actor) for e in events] == [
        (AuditKind.ACCEPTED, "api"),
        (AuditKind.DEDUPLICATED, "api"),
        (AuditKind.CLAIMED, "w1"),
        (AuditKind.RETRIED, "w1"),
        (AuditKind.CLAIMED, "w2"),
        (AuditKind.VERIFYING, "w2"),
        (AuditKind.FINISHED, "w2"),
    ]
    assert all(e.job_id == job.id for e in events)
    stamps = [e.at for e in events]
    assert stamps == sorted(stamps)


async def test_prune_deletes_old_finished_jobs_with_their_attempts_audit_and_keys(
    store: Store,
) -> None:
    """Retention removes terminal jobs finished before the cutoff; live ones always stay."""
    done = (await store.enqueue(new_job("co-1", "app-1", idempotency_key="k1"))).job
    live = (await store.enqueue(new_job("co-2", "app-2"))).job
    c = await claim_one(store)
    await store.record_attempt(c.job.id, c.token, attempt())
    await store.transition(c.job.id, c.token, JobStatus.SUCCEEDED)
    await store.record_rejection("api", "forbidden", {})

    assert await store.prune(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.prune(datetime.now(UTC) + timedelta(seconds=1)) == 1
    with pytest.raises(JobNotFound):
        await store.get(done.id)
    with pytest.raises(JobNotFound):
        await store.audit(done.id)
    assert (await store.get(live.id)).status is JobStatus.QUEUED
    assert await store.rejections() == []
    # the key went with its job: the same key now starts a new job
    again = await store.enqueue(new_job("co-1", "app-1", idempotency_key="k1"))
    assert not again.deduplicated
    assert again.job.id != done.id

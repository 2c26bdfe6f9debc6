"""The worker against the simulator over real sockets: each job flow of issue 4, end to end.

Every test runs a real :class:`Worker` on a real SQLite store and checks the job's final
state, its recorded attempts, and the simulator's own call log (``/_sim/calls``), whose
``accepted`` flag counts the aborts that took effect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.jobs import AttemptOutcome, JobStatus
from orchestrator.sae import SaeClient
from orchestrator.simulator import SimulatorServer
from orchestrator.store import Store
from orchestrator.worker import Worker

from .conftest import SimControl
from .worker_harness import (
    config,
    enqueue,
    new_metrics,
    running,
    sae_client,
    sample,
    sqlite_store,
    wait_terminal,
)

ABORT = "AbortAndRollbackChangeOrder"
DESCRIBE = "DescribeChangeOrder"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh SQLite store."""
    store = await sqlite_store(tmp_path)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def client(simulator: SimulatorServer) -> AsyncIterator[SaeClient]:
    """An open SAE client for the simulator, 1 s read timeout."""
    async with sae_client(simulator.endpoint) as sae:
        yield sae


async def accepted_aborts(control: SimControl, change_order_id: str) -> int:
    """How many aborts of ``change_order_id`` took effect in the simulator."""
    calls = await control.calls(action=ABORT, change_order_id=change_order_id)
    return sum(1 for call in calls if call["accepted"])


async def run_one(store: Store, client: SaeClient, job_id: str, **overrides: object):  # type: ignore[no-untyped-def]
    """Run a worker until ``job_id`` is terminal; return the job."""
    worker = Worker(store, client, new_metrics(), config(**overrides))
    async with running(worker):
        jobs = await wait_terminal(store, [job_id])
    return jobs[job_id]


async def test_busy_app_succeeds_after_retries(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """An app busy for 5 s is rolled back once free; each attempt carries RequestId and TraceId."""
    order = await sim_control.create_change_order("app-busy", rollback_s=0.2)
    await sim_control.set_busy("app-busy", 5)
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id, retry_max_interval_s=1.0)
    assert job.status is JobStatus.SUCCEEDED
    aborts = [a for a in job.attempts if a.action == ABORT]
    assert len(aborts) >= 2
    assert aborts[0].code == "Application.ChangerOrderRunning"
    assert aborts[0].outcome is AttemptOutcome.RETRY
    assert aborts[-1].outcome is AttemptOutcome.SUCCESS
    for attempt in job.attempts:
        assert attempt.request_id, attempt
        assert attempt.trace_id, attempt
    assert await accepted_aborts(sim_control, order) == 1


async def test_throttled_call_is_retried(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """A Throttling.User answer is retried, not failed, and the abort then goes through."""
    order = await sim_control.create_change_order("app-throttled", rollback_s=0.1)
    await sim_control.add_fault(action=ABORT, code="Throttling.User", count=1)
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.SUCCEEDED
    aborts = [a for a in job.attempts if a.action == ABORT]
    assert [a.code for a in aborts] == ["Throttling.User", "Success"]
    assert aborts[0].outcome is AttemptOutcome.RETRY
    assert aborts[0].request_id
    assert await accepted_aborts(sim_control, order) == 1


async def test_credential_source_outage_is_retried_not_failed(
    store: Store, simulator: SimulatorServer, sim_control: SimControl
) -> None:
    """The credential chain failing twice (a metadata-service blip) delays the rollback; it
    does not fail it. Nothing reaches SAE until credentials come back; one accepted abort."""
    from orchestrator.sae import Credentials, CredentialsError, SaeClient
    from orchestrator.sae.credentials import StaticCredentials

    from .worker_harness import TEST_ACCESS_KEY_ID, TEST_ACCESS_KEY_SECRET

    class Flaky:
        def __init__(self) -> None:
            self.failures = 2
            self.good = StaticCredentials(TEST_ACCESS_KEY_ID, TEST_ACCESS_KEY_SECRET)

        async def get(self) -> Credentials:
            if self.failures:
                self.failures -= 1
                raise CredentialsError("ECS metadata service: connection refused")
            return await self.good.get()

    order = await sim_control.create_change_order("app-creds", rollback_s=0.1)
    job_id = await enqueue(store, change_order_id=order)
    flaky = SaeClient(
        region="cn-hangzhou",
        credentials=Flaky(),
        endpoint=simulator.endpoint,
        protocol="http",
        connect_timeout_s=0.5,
        read_timeout_s=1.0,
    )
    async with flaky:
        job = await run_one(store, flaky, job_id)
    assert job.status is JobStatus.SUCCEEDED, job.to_dict()
    codes = [(a.action, a.code, a.outcome) for a in job.attempts[:2]]
    assert codes == [(DESCRIBE, "InvalidCredentials", AttemptOutcome.RETRY)] * 2
    assert all(a.request_id is None for a in job.attempts[:2])  # never sent
    assert await accepted_aborts(sim_control, order) == 1


async def test_sae_outage_opens_the_breaker_and_jobs_wait_without_calling(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """SAE answers 503 to everything: after 3 failures in a row the worker stops calling
    (jobs wait as circuit_open, their retry budget untouched by doomed calls), probes now and
    then, and once SAE is back every job finishes with one accepted abort each."""
    orders = [
        await sim_control.create_change_order(f"app-outage-{i}", rollback_s=0.1) for i in range(4)
    ]
    await sim_control.add_fault(http_status=503, count=100_000)
    metrics = new_metrics()
    worker = Worker(
        store,
        client,
        metrics,
        config(breaker_failures=3, breaker_open_s=0.4, retry_max_elapsed_s=60.0),
    )
    ids = [await enqueue(store, change_order_id=order) for order in orders]
    async with running(worker):
        await asyncio.sleep(2.5)
        during = len(await sim_control.calls())
        assert sample(metrics, "sae_rollback_circuit_open") == 1
        waiting = [await store.get(job_id) for job_id in ids]
        assert {j.status for j in waiting} <= {JobStatus.WAITING, JobStatus.RUNNING}
        assert any(j.error_code == "circuit_open" for j in waiting)
        await sim_control.clear_faults()
        jobs = await wait_terminal(store, ids, timeout_s=30)
    # Without the breaker, four jobs retrying every 0.05-0.3 s would have made dozens of
    # calls in 2.5 s; with it: the 3 that opened it, the calls already on the wire, and a
    # probe after 0.4, 0.8 (doubled), ... seconds.
    assert during <= 12, during
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    for order in orders:
        assert await accepted_aborts(sim_control, order) == 1
    assert sample(metrics, "sae_rollback_circuit_open") == 0
    assert sample(metrics, "sae_rollback_retries_total", {"reason": "circuit_open"}) > 0


async def test_three_503s_are_retried_with_reconcile(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """503 three times: every retry reads the order first, and exactly one abort takes effect."""
    order = await sim_control.create_change_order("app-503", rollback_s=0.1)
    await sim_control.add_fault(action=ABORT, http_status=503, count=3)
    job_id = await enqueue(store, change_order_id=order)
    metrics = new_metrics()
    worker = Worker(store, client, metrics, config())
    async with running(worker):
        job = (await wait_terminal(store, [job_id]))[job_id]
    assert job.status is JobStatus.SUCCEEDED
    actions = [(a.action, a.code) for a in job.attempts]
    # pre-check, then (abort 503, reconcile describe) x 3, then the accepted abort.
    assert actions[:7] == [
        (DESCRIBE, "Success"),
        (ABORT, "ServiceUnavailable"),
        (DESCRIBE, "Success"),
        (ABORT, "ServiceUnavailable"),
        (DESCRIBE, "Success"),
        (ABORT, "ServiceUnavailable"),
        (DESCRIBE, "Success"),
    ]
    assert actions[7] == (ABORT, "Success")
    assert sample(metrics, "sae_rollback_retries_total", {"reason": "server"}) == 3
    assert sample(metrics, "sae_rollback_jobs_finished_total", {"status": "succeeded"}) == 1
    assert await accepted_aborts(sim_control, order) == 1


@pytest.mark.parametrize("mode", ["hang", "reset", "garbage"])
async def test_lost_answer_after_abort_took_effect_is_reconciled(
    store: Store, client: SaeClient, sim_control: SimControl, mode: str
) -> None:
    """The abort takes effect but its answer is lost: the reconcile sees it, no second abort."""
    order = await sim_control.create_change_order(f"app-{mode}", rollback_s=0.3)
    await sim_control.add_fault(action=ABORT, mode=mode, apply=True)
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.SUCCEEDED, job.to_dict()
    first_abort = next(a for a in job.attempts if a.action == ABORT)
    assert first_abort.outcome is AttemptOutcome.RETRY
    assert first_abort.code == "Transport"
    # Whatever happened next (order already 6, or Not.Running on a second try), SAE saw one
    # accepted abort of this order from us.
    assert await accepted_aborts(sim_control, order) == 1
    order_state = await sim_control.change_order(order)
    assert order_state["status"] == 6


async def test_not_found_fails_with_sae_code(store: Store, client: SaeClient) -> None:
    """An unknown change order fails at the pre-check with SAE's code and message."""
    job_id = await enqueue(store, change_order_id="no-such-order")
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "InvalidChangeOrder.NotFound"
    assert job.error_message == "The current change order does not exist."
    assert [a.action for a in job.attempts] == [DESCRIBE]


async def test_no_permission_fails_without_retry(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """A permission error on the abort fails the job after exactly one abort attempt."""
    order = await sim_control.create_change_order("app-denied")
    await sim_control.add_fault(action=ABORT, code="Resouce.no.permission")
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "Resouce.no.permission"
    aborts = [a for a in job.attempts if a.action == ABORT]
    assert len(aborts) == 1
    assert aborts[0].outcome is AttemptOutcome.FAILED
    assert aborts[0].request_id
    assert aborts[0].trace_id
    assert await accepted_aborts(sim_control, order) == 0


async def test_retry_budget_exhausted_fails(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """An app that stays busy past max_elapsed_s fails the job, saying why."""
    order = await sim_control.create_change_order("app-forever-busy")
    await sim_control.set_busy("app-forever-busy", 120)
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id, retry_max_elapsed_s=1.0)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "retry_budget_exhausted"
    assert job.error_message is not None
    assert "Application.ChangerOrderRunning" in job.error_message
    first = job.attempts[0].started_at
    last = job.attempts[-1].started_at
    # The last try happens at the deadline, not after it.
    assert 0.9 <= (last - first).total_seconds() <= 1.5
    assert await accepted_aborts(sim_control, order) == 0


async def test_app_only_job_resolves_running_order(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """A job naming only an app rolls back that app's running change order."""
    await sim_control.create_change_order("app-resolve", status=2)
    running_order = await sim_control.create_change_order("app-resolve", rollback_s=0.1)
    job_id = await enqueue(store, app_id="app-resolve")
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert job.change_order_id == running_order
    assert job.attempts[0].action == "DescribeApplicationStatus"
    assert await accepted_aborts(sim_control, running_order) == 1


async def test_app_only_job_with_nothing_running_is_skipped(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """An app whose change orders all ended has nothing to roll back: skipped with the reason."""
    await sim_control.create_change_order("app-idle", status=2)
    job_id = await enqueue(store, app_id="app-idle")
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.SKIPPED
    assert job.error_code == "nothing_to_roll_back"
    assert [a.action for a in job.attempts] == ["DescribeApplicationStatus", "ListChangeOrders"]


async def test_terminal_order_is_skipped_with_status(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """An order that already failed (3) is skipped at the pre-check, naming its status."""
    order = await sim_control.create_change_order("app-done", status=3)
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.SKIPPED
    assert job.error_code == "already_terminal"
    assert job.error_message is not None
    assert "3 (failed)" in job.error_message
    assert [a.action for a in job.attempts] == [DESCRIBE]


async def test_order_without_rollback_support_fails(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """SupportRollback false fails the job without calling the abort."""
    order = await sim_control.create_change_order("app-norb", support_rollback=False)
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "rollback_not_supported"
    assert [a.action for a in job.attempts] == [DESCRIBE]


async def test_change_order_of_another_app_fails_without_abort(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """A job naming app A with a change order of app B fails before any abort is sent."""
    order = await sim_control.create_change_order("app-other")
    job_id = await enqueue(store, change_order_id=order, app_id="app-allowed")
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "app_mismatch"
    assert [a.action for a in job.attempts] == [DESCRIBE]
    assert (await sim_control.change_order(order))["status"] == 1


async def test_dry_run_records_calls_and_calls_nothing(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """A dry-run job records the calls it would make; the simulator receives none."""
    order = await sim_control.create_change_order("app-dry")
    job_id = await enqueue(store, change_order_id=order, dry_run=True)
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.SKIPPED
    assert job.error_code == "dry_run"
    assert [(a.action, a.code) for a in job.attempts] == [(DESCRIBE, "DryRun"), (ABORT, "DryRun")]
    assert await sim_control.calls() == []


async def test_not_running_after_someone_elses_abort_is_verified(
    store: Store, client: SaeClient, sim_control: SimControl, signed: object
) -> None:
    """Not.Running while a rollback (started elsewhere) runs: verify, then succeeded."""
    order = await sim_control.create_change_order("app-other", rollback_s=0.5)
    answer = await signed.abort(order)  # type: ignore[attr-defined]
    assert answer.status == 200
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id)
    assert job.status is JobStatus.SUCCEEDED
    codes = [(a.action, a.code) for a in job.attempts]
    assert (ABORT, "Application.ChangerOrder.Not.Running") in codes
    assert codes[-1] == (DESCRIBE, "Success")


async def test_verification_timeout_fails(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """A rollback still running when verify timeout_s passes fails with the last status."""
    order = await sim_control.create_change_order("app-slow", rollback_s=30)
    job_id = await enqueue(store, change_order_id=order)
    job = await run_one(store, client, job_id, verify_timeout_s=0.5)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "verify_timeout"
    assert job.error_message is not None
    assert "1 (running)" in job.error_message
    assert await accepted_aborts(sim_control, order) == 1


async def test_dead_workers_job_is_rescued_and_reconciled(
    store: Store, client: SaeClient, sim_control: SimControl
) -> None:
    """A worker died after its abort took effect: rescue, reconcile, one accepted abort."""
    order = await sim_control.create_change_order("app-orphan", rollback_s=0.5)
    job_id = await enqueue(store, change_order_id=order)
    # A worker that claims with a short lease, gets its abort through, and dies unrecorded.
    claimed = await store.claim("doomed-worker", 0.3, 1)
    assert [c.job.id for c in claimed] == [job_id]
    await client.abort_and_rollback(order)
    job = await run_one(store, client, job_id, rescue_interval_s=0.2)
    assert job.status is JobStatus.SUCCEEDED
    assert job.attempt_count == 2
    events = [str(e.event) for e in await store.audit(job_id)]
    assert "rescued" in events
    assert job.attempts[0].action == DESCRIBE  # the reconcile read came first
    assert await accepted_aborts(sim_control, order) == 1

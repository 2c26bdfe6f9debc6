"""Helpers for the worker's integration tests: a store, a client and a running Worker.

Not a test module: imported by ``tests/integration/test_worker_*.py``. Everything talks to a
real :class:`SimulatorServer` over loopback sockets and a real store (SQLite in a temporary
directory unless a test passes another).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from orchestrator.jobs import Job, NewJob
from orchestrator.metrics import Metrics
from orchestrator.sae import SaeClient, StaticCredentials
from orchestrator.store import Store, open_store
from orchestrator.worker import Worker, WorkerConfig

TEST_ACCESS_KEY_ID = "LTAI5tTESTONLYAKID00000"
TEST_ACCESS_KEY_SECRET = "TestOnlySecretDoNotUse0000000000"

#: Fast settings: small waits so that retries and verification take tenths of seconds.
FAST = WorkerConfig(
    owner="itest-worker",
    concurrency=8,
    lease_s=5.0,
    max_attempts=10,
    drain_grace_s=3.0,
    retry_initial_s=0.05,
    retry_max_interval_s=0.3,
    retry_max_elapsed_s=20.0,
    verify_enabled=True,
    verify_poll_interval_s=0.1,
    verify_timeout_s=10.0,
    calls_per_minute=0.0,
    gauge_interval_s=0.2,
    idle_poll_s=0.5,
)


async def sqlite_store(tmp_path: Path, name: str = "worker.db") -> Store:
    """A migrated, opened SQLite store in ``tmp_path``."""
    store = open_store(f"sqlite:///{tmp_path / name}")
    await store.open(migrate=True)
    return store


def sae_client(endpoint: str, *, read_timeout_s: float = 1.0) -> SaeClient:
    """A client for the simulator at ``endpoint`` with the test key (not opened)."""
    return SaeClient(
        region="cn-hangzhou",
        credentials=StaticCredentials(TEST_ACCESS_KEY_ID, TEST_ACCESS_KEY_SECRET),
        endpoint=endpoint,
        protocol="http",
        connect_timeout_s=0.5,
        read_timeout_s=read_timeout_s,
    )


def config(**overrides: Any) -> WorkerConfig:
    """The fast test config with ``overrides``."""
    return replace(FAST, **overrides)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` in a task for the ``async with`` body, then stop it and wait."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def enqueue(
    store: Store,
    *,
    change_order_id: str | None = None,
    app_id: str | None = None,
    dry_run: bool = False,
) -> str:
    """Enqueue one job through the Store API; return its id."""
    result = await store.enqueue(
        NewJob(
            region="cn-hangzhou",
            source="itest",
            change_order_id=change_order_id,
            app_id=app_id,
            dry_run=dry_run,
            reason="integration test",
        )
    )
    return result.job.id


async def wait_terminal(
    store: Store, job_ids: Iterable[str], timeout_s: float = 20.0
) -> dict[str, Job]:
    """Poll until every job is terminal; return them (with attempts). Fails on timeout."""
    ids = list(job_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = {job_id: await store.get(job_id) for job_id in ids}
        if all(job.status.is_terminal for job in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            states = {job_id: str(job.status) for job_id, job in jobs.items()}
            raise AssertionError(f"jobs not terminal after {timeout_s} s: {states}")
        await asyncio.sleep(0.05)


def new_metrics() -> Metrics:
    """Metrics on a fresh registry."""
    return Metrics(CollectorRegistry())


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample value from ``metrics``' registry (0 when absent)."""
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value

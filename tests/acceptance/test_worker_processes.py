"""The worker as real processes: SIGKILL mid-call, SIGTERM drain, two workers on PostgreSQL.

Each test writes a TOML config into ``tmp_path``, starts the simulator in the test process
(so its call log is at hand), runs ``sae-rollback migrate`` and then one or more
``sae-rollback worker`` processes, and enqueues jobs directly through the Store API.
Credentials reach the workers through the default chain's environment variables.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.jobs import Job, NewJob
from orchestrator.simulator import SimulatorServer
from orchestrator.store import Store, open_store
from tests.contract.engines import pg_dsn_or_skip, pg_schema

ACCESS_KEY_ID = "LTAI5tTESTONLYAKID00000"
ACCESS_KEY_SECRET = "TestOnlySecretDoNotUse0000000000"
CLI = str(Path(sys.executable).with_name("sae-rollback"))
ABORT = "AbortAndRollbackChangeOrder"
LEASE_S = 3.0

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A free loopback port (for the worker's metrics/health listener)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    tmp_path: Path,
    store_url: str,
    endpoint: str,
    *,
    verify: bool = True,
    grace_s: float = 5.0,
    name: str = "worker",
) -> Path:
    """A worker config for the simulator at ``endpoint``: short lease, fast retries."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {free_port()}

[store]
url = "{store_url}"

[sae]
endpoint = "{endpoint}"
protocol = "http"
connect_timeout_s = 0.5
read_timeout_s = 1
calls_per_minute = 0

[retry]
initial_s = 0.1
max_interval_s = 0.5
max_elapsed_s = 60

[worker]
concurrency = 8
lease_s = {LEASE_S}
max_attempts = 10
drain_grace_s = {grace_s}

[verify]
enabled = {"true" if verify else "false"}
poll_interval_s = 0.2
timeout_s = 60
"""
    )
    return path


def child_env() -> dict[str, str]:
    """The environment of a worker process: test credentials, loopback only."""
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=ACCESS_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=ACCESS_KEY_SECRET,
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
        ALIBABA_CLOUD_CLI_PROFILE_DISABLED="true",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


@dataclass
class WorkerProcess:
    """One ``sae-rollback worker`` child process and its log file."""

    proc: asyncio.subprocess.Process
    log: Path

    async def wait_started(self, timeout_s: float = 20.0) -> None:
        """Until the worker logged ``worker_started`` (fails if it exits first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "worker_started" in self.log.read_text(errors="replace"):
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"worker did not start:\n{self.log.read_text(errors='replace')}")

    async def stop(self) -> None:
        """SIGKILL if still running (cleanup)."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def run_cli(*args: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    """Start ``sae-rollback ARGS`` with output going to ``log``."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            CLI, "--log-format", "json", *args, env=env, stdout=out, stderr=out
        )


async def migrate(config: Path, tmp_path: Path) -> None:
    """``sae-rollback migrate`` must succeed."""
    proc = await run_cli(
        "migrate", "--config", str(config), env=child_env(), log=tmp_path / "migrate.log"
    )
    assert await asyncio.wait_for(proc.wait(), 60) == 0, (tmp_path / "migrate.log").read_text()


async def start_worker(config: Path, tmp_path: Path, name: str) -> WorkerProcess:
    """Start a worker process and wait until it runs."""
    log = tmp_path / f"{name}.log"
    proc = await run_cli("worker", "--config", str(config), env=child_env(), log=log)
    worker = WorkerProcess(proc, log)
    await worker.wait_started()
    return worker


async def terminate_all(workers: list[WorkerProcess]) -> None:
    """SIGTERM every worker still running; each must exit 0 within 15 s (killed if not)."""
    for worker in workers:
        if worker.proc.returncode is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            assert await asyncio.wait_for(worker.proc.wait(), 15) == 0
        finally:
            await worker.stop()


async def wait_terminal(store: Store, ids: list[str], timeout_s: float) -> dict[str, Job]:
    """Until every job is terminal (fails on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = {i: await store.get(i) for i in ids}
        if all(j.status.is_terminal for j in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError({i: str(j.status) for i, j in jobs.items()})
        await asyncio.sleep(0.1)


async def enqueue(store: Store, change_order_id: str, app_id: str | None = None) -> str:
    """One job through the Store API."""
    new = NewJob(
        region="cn-hangzhou", source="acceptance", change_order_id=change_order_id, app_id=app_id
    )
    return (await store.enqueue(new)).job.id


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatorServer]:
    """The simulator in this process, with the test key."""
    async with SimulatorServer(credentials={ACCESS_KEY_ID: ACCESS_KEY_SECRET}, seed=11) as sim:
        yield sim


async def wait_for_aborts(sim: SimulatorServer, count: int = 1, timeout_s: float = 20) -> None:
    """Until ``count`` abort calls have arrived at the simulator (fails on timeout)."""
    deadline = time.monotonic() + timeout_s
    while sum(1 for c in sim.state.calls if c.action == ABORT) < count:
        assert time.monotonic() < deadline, f"fewer than {count} abort call(s) arrived"
        await asyncio.sleep(0.02)


def accepted(sim: SimulatorServer, change_order_id: str) -> int:
    """Aborts of ``change_order_id`` that took effect."""
    return sum(
        1
        for call in sim.state.calls
        if call.action == ABORT and call.change_order_id == change_order_id and call.accepted
    )


async def test_sigkill_mid_call_another_worker_finishes_once(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    """SIGKILL while the abort is on the wire: a new worker reconciles; one accepted abort."""
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    config = write_config(tmp_path, store_url, simulator.endpoint)
    await migrate(config, tmp_path)
    order = simulator.state.create_change_order("kill-app", rollback_s=1.0).change_order_id
    # The abort takes 1.5 s on the server side, and proceeds even after the client died.
    simulator.faults.add(_latency_fault(ABORT, 1500))
    store = open_store(store_url)
    await store.open()
    first = second = None
    try:
        job_id = await enqueue(store, order)
        first = await start_worker(config, tmp_path, "first")
        await wait_for_aborts(simulator)
        first.proc.send_signal(signal.SIGKILL)
        assert await first.proc.wait() == -signal.SIGKILL
        second = await start_worker(config, tmp_path, "second")
        job = (await wait_terminal(store, [job_id], timeout_s=30))[job_id]
        assert str(job.status) == "succeeded", job.to_dict()
        assert accepted(simulator, order) == 1
        events = [str(e.event) for e in await store.audit(job_id)]
        assert "rescued" in events
        # The killed run left no row for its abort; the second run reconciled first.
        second_run = [a for a in job.attempts if a.run == 2]
        assert second_run[0].action == "DescribeChangeOrder"
    finally:
        for proc in (first, second):
            if proc is not None:
                await proc.stop()
        await store.close()


async def test_sigterm_drains_in_flight_jobs_and_exits_zero(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    """SIGTERM while three aborts are in flight: they finish, exit 0 within the grace."""
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    grace_s = 5.0
    config = write_config(tmp_path, store_url, simulator.endpoint, verify=False, grace_s=grace_s)
    await migrate(config, tmp_path)
    orders = [
        simulator.state.create_change_order(f"term-app-{i}").change_order_id for i in range(3)
    ]
    # Slow answers, but within the 1 s read timeout: the calls are in flight at SIGTERM.
    fault = _latency_fault(ABORT, 700)
    fault.remaining = 3
    simulator.faults.add(fault)
    store = open_store(store_url)
    await store.open()
    worker = None
    try:
        ids = [await enqueue(store, order) for order in orders]
        worker = await start_worker(config, tmp_path, "term")
        await wait_for_aborts(simulator, 3)
        signalled = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.proc.wait(), grace_s + 5)
        took = time.monotonic() - signalled
        assert code == 0, worker.log.read_text()
        assert took < grace_s, took
        jobs = {i: await store.get(i) for i in ids}
        assert {str(j.status) for j in jobs.values()} == {"succeeded"}
        assert all(accepted(simulator, order) == 1 for order in orders)
        assert "worker_draining" in worker.log.read_text()
    finally:
        if worker is not None:
            await worker.stop()
        await store.close()


async def test_second_sigterm_stops_at_once_and_says_so(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    """A second signal while draining: exit 1 now, with a one-line reason on stderr."""
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    config = write_config(tmp_path, store_url, simulator.endpoint, verify=False, grace_s=30)
    # A call that stays on the wire for 15 s, so the drain would wait for it.
    text = config.read_text().replace("read_timeout_s = 1", "read_timeout_s = 20")
    config.write_text(text.replace(f"lease_s = {LEASE_S}", "lease_s = 30"))
    await migrate(config, tmp_path)
    order = simulator.state.create_change_order("impatient-app").change_order_id
    simulator.faults.add(_latency_fault(ABORT, 15_000))
    store = open_store(store_url)
    await store.open()
    worker = None
    try:
        await enqueue(store, order)
        worker = await start_worker(config, tmp_path, "impatient")
        await wait_for_aborts(simulator)
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert worker.proc.returncode is None  # draining: waiting for the call
        worker.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.proc.wait(), 5) == 1
        assert "sae-rollback: second signal: stopping now" in worker.log.read_text()
    finally:
        if worker is not None:
            await worker.stop()
        await store.close()


@pytest.mark.postgres
async def test_two_workers_on_postgres_never_run_one_app_twice(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    """Two worker processes share PostgreSQL: jobs of one app never run at the same time."""
    dsn = pg_dsn_or_skip()
    async with pg_schema(dsn) as schema:
        store_url = f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"
        configs = [
            write_config(tmp_path, store_url, simulator.endpoint, name=f"pg{n}") for n in range(2)
        ]
        await migrate(configs[0], tmp_path)
        apps = 6
        # Slow answers widen the window in which a second job of an app could sneak in.
        simulator.faults.add(_latency_fault(None, 150, count=10_000))
        live = {}
        done = {}
        for i in range(apps):
            done[i] = simulator.state.create_change_order(f"pg-app-{i}", status=2).change_order_id
            live[i] = simulator.state.create_change_order(
                f"pg-app-{i}", rollback_s=0.3
            ).change_order_id
        store = open_store(store_url)
        await store.open()
        workers = []
        try:
            # Both workers run before the jobs arrive: each enqueue's NOTIFY wakes both, so
            # both get work (started afterwards, the first could finish all before the second
            # is up on a loaded machine).
            workers = [await start_worker(configs[n], tmp_path, f"pg{n}") for n in range(2)]
            ids: dict[str, int] = {}
            for i in range(apps):
                ids[await enqueue(store, live[i], f"pg-app-{i}")] = i
                ids[await enqueue(store, done[i], f"pg-app-{i}")] = i
            jobs = await wait_terminal(store, list(ids), timeout_s=60)
            assert (
                sorted(str(j.status) for j in jobs.values())
                == ["skipped"] * apps + ["succeeded"] * apps
            )
            for i in range(apps):
                assert accepted(simulator, live[i]) == 1
            runs: dict[int, list[tuple[datetime, datetime, str, str]]] = defaultdict(list)
            owners = set()
            for job_id, app in ids.items():
                for start, end, owner in await _runs(store, job_id):
                    runs[app].append((start, end, job_id, owner))
                    owners.add(owner)
            for app, spans in runs.items():
                for (s1, e1, j1, _), (s2, e2, j2, _) in itertools.combinations(spans, 2):
                    overlap = s1 < e2 and s2 < e1
                    assert j1 == j2 or not overlap, (
                        f"app {app}: runs of {j1} and {j2} overlap: {spans}"
                    )
            assert len(owners) == 2, owners  # both processes did work
        finally:
            await terminate_all(workers)
            await store.close()


@pytest.mark.postgres
async def test_two_workers_on_postgres_share_one_call_budget(tmp_path: Path) -> None:
    """Two worker processes, each configured with the account's 120 calls/min, against a
    simulator that throttles above 120/min like SAE: not one Throttling.User, both did
    work, and the run took as long as ONE budget requires (two budgets would halve it)."""
    from orchestrator.worker.budget import bucket_shape

    dsn = pg_dsn_or_skip()
    per_minute = 120
    jobs_n = 20
    async with (
        SimulatorServer(
            credentials={ACCESS_KEY_ID: ACCESS_KEY_SECRET}, seed=12, calls_per_minute=per_minute
        ) as sim,
        pg_schema(dsn) as schema,
    ):
        store_url = f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"
        configs = []
        for n in range(2):
            path = write_config(tmp_path, store_url, sim.endpoint, verify=False, name=f"b{n}")
            text = path.read_text().replace(
                "calls_per_minute = 0", f"calls_per_minute = {per_minute}"
            )
            path.write_text(text)
            configs.append(path)
        await migrate(configs[0], tmp_path)
        orders = [
            sim.state.create_change_order(f"budget-app-{i}").change_order_id for i in range(jobs_n)
        ]
        store = open_store(store_url)
        await store.open()
        workers = []
        try:
            workers = [await start_worker(configs[n], tmp_path, f"b{n}") for n in range(2)]
            started = time.monotonic()
            ids = [await enqueue(store, order) for order in orders]
            jobs = await wait_terminal(store, ids, timeout_s=90)
            elapsed = time.monotonic() - started
            assert {str(j.status) for j in jobs.values()} == {"succeeded"}
            owners = {owner for job_id in ids for _, _, owner in await _runs(store, job_id)}
            assert len(owners) == 2, owners  # both processes did work
        finally:
            await terminate_all(workers)
            await store.close()
        calls = list(sim.state.calls)
    assert sum(1 for c in calls if c.code == "Throttling.User") == 0
    assert len(calls) == 2 * jobs_n  # pre-check + abort each, no retries needed
    rate, burst = bucket_shape(per_minute)
    required = (len(calls) - burst) * 60.0 / rate
    assert elapsed >= 0.9 * required, (elapsed, required)
    assert elapsed <= 1.3 * required + 5, (elapsed, required)


async def test_api_alone_reports_the_queue_while_no_worker_runs(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    """Every worker down, only `sae-rollback api` up: its /metrics still shows the queued job
    and its age growing (what the queue-age alert and the dashboard read), and the budget."""
    import aiohttp

    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    config = write_config(tmp_path, store_url, simulator.endpoint)
    text = config.read_text().replace("calls_per_minute = 0", "calls_per_minute = 42")
    config.write_text(
        text + '\n[sources.ops]\nkind = "api"\ntoken = "t0k3n-for-the-api"\nallowed_apps = ["*"]\n'
    )
    port = int(text.split("port = ")[1].split()[0])
    await migrate(config, tmp_path)
    store = open_store(store_url)
    await store.open()
    log = tmp_path / "api.log"
    proc = await run_cli("api", "--config", str(config), env=child_env(), log=log)
    try:
        await enqueue(store, "co-nobody-claims")
        deadline = time.monotonic() + 20
        queued = age = budget = None
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        body = await resp.text()
                except aiohttp.ClientConnectionError:
                    assert proc.returncode is None, log.read_text()
                    await asyncio.sleep(0.1)
                    continue
                values = dict(
                    line.rsplit(" ", 1) for line in body.splitlines() if line[:1] not in ("#", "")
                )
                queued = float(values['sae_rollback_jobs{status="queued"}'])
                age = float(values["sae_rollback_oldest_queued_age_seconds"])
                budget = float(values["sae_rollback_api_budget_per_minute"])
                if queued == 1 and age > 0:
                    break
                await asyncio.sleep(0.2)
        assert (queued, budget) == (1, 42), log.read_text()
        assert age is not None
        assert age > 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        await store.close()


async def _runs(store: Store, job_id: str) -> list[tuple[datetime, datetime, str]]:
    """(claimed at, lease ended at, owner) of every run of a job, from its audit trail."""
    spans = []
    start: datetime | None = None
    owner = ""
    for event in await store.audit(job_id):
        kind = str(event.event)
        if kind == "claimed":
            start, owner = event.at, event.actor or ""
        elif kind in ("finished", "retried", "released", "rescued") and start is not None:
            spans.append((start, event.at, owner))
            start = None
    return spans


def _latency_fault(action: str | None, latency_ms: int, count: int = 1) -> Any:
    """A fault that delays the answer (the call still takes effect)."""
    from orchestrator.simulator import Fault

    return Fault(
        action=action,
        change_order_id=None,
        mode=None,
        http_status=200,
        code=None,
        message=None,
        latency_s=latency_ms / 1000,
        apply=False,
        remaining=count,
        retry_after_ms=None,
    )

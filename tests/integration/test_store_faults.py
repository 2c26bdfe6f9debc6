"""Store faults with real engines: SQLite disk full, PostgreSQL down and restarted mid-run.

The PostgreSQL tests start a private cluster (initdb into a temp dir, ``pg_ctl`` on a free
loopback port) so they can crash and restart it without touching the shared server. As
root, initdb refuses to run, so the cluster runs as the ``postgres`` OS user (runuser).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from orchestrator.errors import LeaseLost, StoreUnavailable
from orchestrator.jobs import AttemptIn, AttemptOutcome, AuditKind, JobStatus, NewJob
from orchestrator.store import Store, open_store
from orchestrator.store.sqlite import SqliteStore
from tests.contract.engines import sqlite_engine

T = TypeVar("T")

# -- SQLite: disk full -------------------------------------------------------------------------


def _integrity(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


async def test_sqlite_disk_full_is_store_unavailable_and_the_file_stays_intact(
    tmp_path: Path,
) -> None:
    """SQLITE_FULL fails the whole write batch cleanly; nothing half-written; recovers after."""
    engine = sqlite_engine(tmp_path)
    store = await engine.opened()
    assert isinstance(store, SqliteStore)
    path = engine.url.removeprefix("sqlite:///")
    try:
        writer = store._writer  # fault injection: cap the file size on the writer connection
        assert writer is not None
        pages = await writer.call(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await writer.call(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 8}"))

        accepted: set[str] = set()
        refused: list[StoreUnavailable] = []
        for batch in range(40):  # bounded: the cap is reached after a few batches
            results = await asyncio.gather(
                *(
                    store.enqueue(
                        NewJob(
                            region="r",
                            source="api",
                            change_order_id=f"co-{batch}-{i}",
                            reason="x" * 2000,
                        )
                    )
                    for i in range(5)
                ),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, StoreUnavailable):
                    refused.append(r)
                elif isinstance(r, BaseException):
                    raise r
                else:
                    accepted.add(r.job.id)
            if refused:
                break
        assert refused, "the page cap never hit"
        assert accepted, "the cap hit before anything was written"
        assert isinstance(refused[0].__cause__, sqlite3.Error)
        assert "full" in str(refused[0]).lower()

        assert _integrity(path) == "ok"
        # exactly the acknowledged jobs exist: a refused enqueue left nothing behind
        stored = {j.id for j in (await store.list_jobs(limit=1000)).items}
        assert stored == accepted

        await writer.call(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        after = await store.enqueue(NewJob(region="r", source="api", change_order_id="co-after"))
        assert not after.deduplicated
        assert (await store.get(after.job.id)).status is JobStatus.QUEUED
    finally:
        await store.close()
    assert _integrity(path) == "ok"


async def test_sqlite_lock_held_elsewhere_is_store_unavailable(tmp_path: Path) -> None:
    """Another process holding the write lock past busy_timeout gives StoreUnavailable."""
    engine = sqlite_engine(tmp_path)
    await engine.new_store().migrate()
    store = engine.new_store(busy_timeout_s=0.2)
    await store.open()
    blocker = sqlite3.connect(engine.url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.enqueue(NewJob(region="r", source="api", change_order_id="co-1"))
        assert time.monotonic() - started < 5
        blocker.execute("ROLLBACK")
        assert not (
            await store.enqueue(NewJob(region="r", source="api", change_order_id="co-1"))
        ).deduplicated
    finally:
        blocker.close()
        await store.close()


async def test_an_uncreatable_sqlite_path_is_store_unavailable(tmp_path: Path) -> None:
    """A store file under a regular file (not a directory) cannot be created: clean error."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = open_store(f"sqlite:///{blocker / 'store.db'}")
    with pytest.raises(StoreUnavailable):
        await store.migrate()
    with pytest.raises(StoreUnavailable):
        await store.open(migrate=True)


async def test_an_unreachable_postgres_is_store_unavailable_at_open() -> None:
    """Nothing listens on the port: open() raises StoreUnavailable, not a socket error."""
    store = open_store(f"postgresql://postgres@127.0.0.1:{_free_port()}/x", connect_timeout_s=2)
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(StoreUnavailable):
        await store.migrate()
    await store.close()


# -- PostgreSQL: a private cluster ---------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    bindir: Path
    data: Path
    port: int
    log: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        cmd = [
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            *args,
        ]
        subprocess.run(_as_postgres(cmd), check=True, capture_output=True, timeout=90)

    def start(self) -> None:
        sock = self.data.parent
        self.ctl("-o", f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1", "start")


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; the postgres OS user exists here
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster on a free loopback port."""
    bindir = _pg_bin()
    if bindir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        if os.environ.get("SAE_ROLLBACK_REQUIRE_PG") == "1":
            pytest.fail("no PostgreSQL binaries under /usr/lib/postgresql", pytrace=False)
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql")
    root = Path(tempfile.mkdtemp(prefix="sae-rollback-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    c = Cluster(bindir, root / "data", _free_port(), root / "log")
    try:
        subprocess.run(
            _as_postgres(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(c.data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        c.start()
        yield c
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            c.ctl("-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


async def _retry_until_ok(op: Callable[[], Awaitable[T]], seconds: float = 30) -> T:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await op()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.postgres
async def test_postgres_down_is_store_unavailable_and_the_pool_recovers(cluster: Cluster) -> None:
    """While the server is down calls raise StoreUnavailable; after it is back they work."""
    store = open_store(cluster.dsn, command_timeout_s=5, connect_timeout_s=2, schema="down")
    await _admin(cluster.dsn, "DROP SCHEMA IF EXISTS down CASCADE; CREATE SCHEMA down")
    await store.open(migrate=True)
    try:
        job = (await store.enqueue(NewJob(region="r", source="api", change_order_id="c"))).job
        await asyncio.to_thread(cluster.ctl, "-m", "immediate", "stop")
        for call in (store.ping(), store.get(job.id), store.claim("w", 30, 1)):
            with pytest.raises(StoreUnavailable):
                await call
        await asyncio.to_thread(cluster.start)
        # the first call may still meet a dead pooled connection; the ones after work
        failures = 0
        for _ in range(5):
            try:
                await store.ping()
                break
            except StoreUnavailable:
                failures += 1
        assert failures <= 1
        assert (await store.get(job.id)).status is JobStatus.QUEUED  # committed = kept
    finally:
        await store.close()


def _cluster_pids(cluster: Cluster) -> list[int]:
    """The postmaster and every server process under it."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
    ).stdout.split()
    return [postmaster, *(int(pid) for pid in children)]


@pytest.mark.postgres
async def test_a_frozen_postgres_times_out_instead_of_hanging(cluster: Cluster) -> None:
    """Every server process stopped (a network black hole: no RST, no answer): calls end in
    StoreUnavailable within the command timeout instead of hanging; once the server
    resumes, the store works again and nothing committed is lost."""
    store = open_store(cluster.dsn, command_timeout_s=2, connect_timeout_s=2, schema="frozen")
    await _admin(cluster.dsn, "DROP SCHEMA IF EXISTS frozen CASCADE; CREATE SCHEMA frozen")
    await store.open(migrate=True)
    pids: list[int] = []
    try:
        job = (await store.enqueue(NewJob(region="r", source="api", change_order_id="c"))).job
        pids = _cluster_pids(cluster)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for call in (store.get(job.id), store.claim("w", 30, 1)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call, 20)  # the store's own timeout must fire first
            assert time.monotonic() - started < 10
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    try:
        assert (await _retry_until_ok(lambda: store.get(job.id))).status is JobStatus.QUEUED
        claimed = await _retry_until_ok(lambda: store.claim("w", 30, 1))
        assert [c.job.id for c in claimed] == [job.id]
    finally:
        await store.close()


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.slow
async def test_postgres_restart_mid_run_loses_no_job(cluster: Cluster) -> None:
    """Workers keep going through an immediate-mode restart; every job ends succeeded once."""
    await _admin(cluster.dsn, "DROP SCHEMA IF EXISTS restart CASCADE; CREATE SCHEMA restart")
    store = open_store(cluster.dsn, command_timeout_s=5, connect_timeout_s=2, schema="restart")
    await store.open(migrate=True)
    n_jobs = 300
    unavailable: list[StoreUnavailable] = []
    done = asyncio.Event()
    try:
        for i in range(n_jobs):
            await store.enqueue(
                NewJob(region="r", source="api", change_order_id=f"co-{i}", app_id=f"app-{i % 30}")
            )

        async def worker(name: str) -> None:
            while not done.is_set():
                try:
                    await store.rescue_expired(max_interrupts=10)
                    claimed = await store.claim(name, 2.0, 2)
                except StoreUnavailable as exc:
                    unavailable.append(exc)
                    await asyncio.sleep(0.1)
                    continue
                if not claimed:
                    await asyncio.sleep(0.02)
                    continue
                for c in claimed:
                    await _finish(store, c.job.id, c.token, unavailable)

        async def restarter() -> None:
            while (await _count_succeeded(store)) < n_jobs // 3:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(cluster.ctl, "-m", "immediate", "restart")

        async def watcher() -> None:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    if await _count_succeeded(store) == n_jobs:
                        break
                except StoreUnavailable:
                    pass
                await asyncio.sleep(0.2)
            done.set()

        await asyncio.gather(restarter(), watcher(), *(worker(f"w{i}") for i in range(4)))

        stats = await _retry_until_ok(store.stats)
        assert stats.counts[JobStatus.SUCCEEDED] == n_jobs
        assert unavailable, "the restart was never noticed: the test did not test anything"
        page = await store.list_jobs(limit=n_jobs)
        for job in page.items:
            finished = [e for e in await store.audit(job.id) if e.event is AuditKind.FINISHED]
            assert len(finished) == 1, job.id
    finally:
        done.set()
        await store.close()


async def _count_succeeded(store: Store) -> int:
    return (await store.stats()).counts[JobStatus.SUCCEEDED]


async def _finish(
    store: Store, job_id: str, token: str, unavailable: list[StoreUnavailable]
) -> None:
    """What a worker does when the store blips: retry the same write with the same token.

    A retried write whose first try did commit (the answer was lost in the crash) finds
    the lease already gone and raises LeaseLost: the job is finished, nothing to do.
    """
    ok = AttemptIn("AbortAndRollbackChangeOrder", datetime.now(UTC), 1, AttemptOutcome.SUCCESS)
    for write in (
        lambda: store.record_attempt(job_id, token, ok),
        lambda: store.transition(job_id, token, JobStatus.SUCCEEDED),
    ):
        for _ in range(300):
            try:
                await write()
                break
            except StoreUnavailable as exc:
                unavailable.append(exc)
                await asyncio.sleep(0.1)
            except LeaseLost:
                return

"""The operations endpoints a worker-only process serves, over real sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from orchestrator.jobs import NewJob
from orchestrator.metrics import Metrics
from orchestrator.ops import JsonErrorAppRunner, build_ops_app, run_job_gauges
from orchestrator.store import open_store


async def test_worker_ops_app_serves_metrics_health_and_readiness(tmp_path: Path) -> None:
    """/metrics and /healthz answer; /readyz turns 503 with Retry-After once the store is gone."""
    store = open_store(f"sqlite:///{tmp_path / 'ops.db'}")
    await store.open(migrate=True)
    metrics = Metrics()
    metrics.jobs.labels("queued").set(3)
    server = TestServer(build_ops_app(store, metrics), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            base = str(server.make_url(""))
            async with http.get(f"{base}/healthz") as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "ok"})
            async with http.get(f"{base}/readyz") as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "ready"})
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert 'sae_rollback_jobs{status="queued"} 3.0' in await resp.text()
            async with http.get(f"{base}/v1/rollbacks") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "not_found"
            await store.close()
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "5"
                assert (await resp.json())["error"]["code"] == "not_ready"
    finally:
        await server.close()
        await store.close()


async def test_job_gauges_follow_the_store_without_a_worker(tmp_path: Path) -> None:
    """run_job_gauges (what an API-only process runs) reports the queue from the store."""
    store = open_store(f"sqlite:///{tmp_path / 'gauges.db'}")
    await store.open(migrate=True)
    metrics = Metrics()
    stop = asyncio.Event()
    try:
        await store.enqueue(NewJob(region="cn-hangzhou", source="t", change_order_id="co-1"))
        loop = asyncio.create_task(run_job_gauges(store, metrics, stop, interval_s=0.05))
        await asyncio.sleep(0.3)
        assert metrics.registry.get_sample_value("sae_rollback_jobs", {"status": "queued"}) == 1
        age = metrics.registry.get_sample_value("sae_rollback_oldest_queued_age_seconds")
        assert age is not None
        assert age > 0.1
        await store.enqueue(NewJob(region="cn-hangzhou", source="t", change_order_id="co-2"))
        await asyncio.sleep(0.2)
        assert metrics.registry.get_sample_value("sae_rollback_jobs", {"status": "queued"}) == 2
        # A store outage is logged and skipped; the loop keeps going and stops on request.
        await store.close()
        await asyncio.sleep(0.2)
        assert not loop.done()
        stop.set()
        await asyncio.wait_for(loop, 2)
    finally:
        stop.set()
        await store.close()


@pytest.mark.parametrize(
    "raw",
    [
        # A header over aiohttp's 8190-byte limit.
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nIdempotency-Key: " + b"k" * 10_000 + b"\r\n\r\n",
        # Not HTTP at all.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n",
        # A header line without a colon.
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    ],
    ids=["header-too-long", "not-http", "malformed-header"],
)
async def test_unparseable_requests_get_a_json_error(
    tmp_path: Path, raw: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """What aiohttp's parser refuses gets the API's JSON error shape, not a text page."""
    store = open_store(f"sqlite:///{tmp_path / 'ops.db'}")
    await store.open(migrate=True)
    runner = JsonErrorAppRunner(build_ops_app(store, Metrics()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400"
        assert b"Content-Type: application/json" in head
        error = json.loads(body)["error"]
        assert error["code"] == "malformed_request"
        assert b"kkkk" not in answer  # the offending header is not echoed
        # A healthy request on a new connection still works.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        await runner.cleanup()
        await store.close()
    assert "Traceback" not in capsys.readouterr().err

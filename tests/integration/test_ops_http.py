"""The operations endpoints a worker-only process serves, over real sockets."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from orchestrator.metrics import Metrics
from orchestrator.ops import build_ops_app
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

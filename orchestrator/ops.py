"""The operations endpoints of a worker-only process: ``/metrics``, ``/healthz``, ``/readyz``.

``sae-rollback worker`` serves no API, but Prometheus must scrape its SAE and job metrics
(they live only in worker processes) and Kubernetes must probe it. The intake app serves
the same three paths with the same meaning, so one scrape config and one probe spec fit
every process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from orchestrator.errors import StoreError
from orchestrator.metrics import Metrics
from orchestrator.store import Store

#: How long ``/readyz`` waits for the store before declaring the process not ready.
READY_TIMEOUT_S: Final = 2.0


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def build_ops_app(store: Store, metrics: Metrics) -> web.Application:
    """An app with the three operations endpoints; anything else is a JSON 404."""

    async def healthz(_request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(store.ping(), READY_TIMEOUT_S)
        except (StoreError, TimeoutError):
            return _json(
                503,
                {"error": {"code": "not_ready", "message": "the job store is not reachable"}},
            )
        return _json(200, {"status": "ready"})

    @web.middleware
    async def json_errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return _json(
                exc.status,
                {"error": {"code": exc.reason.lower().replace(" ", "_"), "message": exc.reason}},
            )

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app

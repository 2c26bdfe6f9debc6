"""The operations endpoints every process serves: ``/metrics``, ``/healthz``, ``/readyz``.

The intake app mounts them beside its API; ``sae-rollback worker`` serves them alone
(:func:`build_ops_app`), because Prometheus must scrape its SAE and job metrics (they live
only in worker processes) and Kubernetes must probe it. One definition, so one scrape
config and one probe spec fit every process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from orchestrator.errors import StoreError
from orchestrator.logging import get_logger
from orchestrator.metrics import Metrics
from orchestrator.store import Store

#: How long ``/readyz`` waits for the store before declaring the process not ready.
READY_TIMEOUT_S: Final = 2.0
#: ``Retry-After`` of a not-ready answer.
NOT_READY_RETRY_AFTER_S: Final = 5

log = get_logger("orchestrator.ops")


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


def add_ops_routes(router: web.UrlDispatcher, store: Store, metrics: Metrics) -> None:
    """Register ``GET /metrics``, ``/healthz`` (liveness) and ``/readyz`` (store reachable)."""

    async def healthz(_request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(store.ping(), READY_TIMEOUT_S)
        except (StoreError, TimeoutError) as exc:
            log.warning("not_ready", error=str(exc) or type(exc).__name__)
            return _json(
                503,
                {"error": {"code": "not_ready", "message": "the job store is not reachable"}},
                {"Retry-After": str(NOT_READY_RETRY_AFTER_S)},
            )
        return _json(200, {"status": "ready"})

    router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)


def build_ops_app(store: Store, metrics: Metrics) -> web.Application:
    """An app with only the operations endpoints; anything else is a JSON error."""

    @web.middleware
    async def json_errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            code = exc.reason.lower().replace(" ", "_")
            return _json(exc.status, {"error": {"code": code, "message": exc.reason}})

    app = web.Application(middlewares=[json_errors])
    add_ops_routes(app.router, store, metrics)
    return app

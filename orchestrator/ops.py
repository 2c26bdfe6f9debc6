"""The operations endpoints every process serves: ``/metrics``, ``/healthz``, ``/readyz``.

The intake app mounts them beside its API; ``sae-rollback worker`` serves them alone
(:func:`build_ops_app`), because Prometheus must scrape its SAE call and job metrics (they
live only in worker processes) and Kubernetes must probe it. One definition, so one scrape
config and one probe spec fit every process.

The store-wide gauges (``sae_rollback_jobs``, ``sae_rollback_oldest_queued_age_seconds``)
are refreshed by every process, ``api`` included (:func:`run_job_gauges`): when every worker
is down, the API processes are the ones left to show the queue ageing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from orchestrator.errors import StoreError
from orchestrator.jobs import JobStatus, QueueStats
from orchestrator.logging import get_logger
from orchestrator.metrics import Metrics
from orchestrator.store import Store

#: How long ``/readyz`` waits for the store before declaring the process not ready.
READY_TIMEOUT_S: Final = 2.0
#: ``Retry-After`` of a not-ready answer.
NOT_READY_RETRY_AFTER_S: Final = 5
#: How often a process without a worker refreshes the store-wide job gauges.
GAUGE_INTERVAL_S: Final = 5.0

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


class _JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse with our JSON error.

    A request line or header over aiohttp's limits, or bytes that are not HTTP, never reach
    the application or its middlewares: aiohttp answers them itself with a text/plain body
    (which may quote the offending header) and logs a traceback. Here they get the API's
    error shape and one warning line.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("http_internal_error", message=message, exc_info=exc)
            code, text = "internal", "internal error"
        else:
            reason = type(exc).__name__ if exc is not None else message
            log.warning("http_malformed_request", status=status, reason=reason)
            code = "malformed_request"
            text = "the request is not valid HTTP or exceeds a size limit (line, header)"
        if request.writer.output_size > 0:
            # Part of a response is out already: the connection can only be dropped.
            raise ConnectionError("response already started; cannot send an error")
        response = _json(status, {"error": {"code": code, "message": text}})
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """An AppRunner whose connections answer unparseable requests with a JSON error."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same object, one method different: the server builds our connection handler.
        server.__class__ = _JsonErrorServer
        return server


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


async def refresh_job_gauges(store: Store, metrics: Metrics) -> QueueStats:
    """Read the queue's counts once and set the store-wide gauges from them."""
    stats = await store.stats()
    for status in JobStatus:
        metrics.jobs.labels(status=str(status)).set(stats.counts.get(status, 0))
    metrics.oldest_queued_age.set(stats.oldest_queued_age_s)
    return stats


async def run_job_gauges(
    store: Store, metrics: Metrics, stop: asyncio.Event, interval_s: float = GAUGE_INTERVAL_S
) -> None:
    """Refresh the job gauges at once and then every ``interval_s`` until ``stop`` is set.

    A store outage is logged and skipped (the gauges keep their last values; ``/readyz``
    is what reports the outage).
    """
    while not stop.is_set():
        try:
            await refresh_job_gauges(store, metrics)
        except StoreError as exc:
            log.warning("gauges_failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)

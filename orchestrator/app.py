"""The composition root: the one place that turns Settings into running components.

It opens the store, builds the SAE client (against the real endpoint with the Alibaba
Cloud default credential chain, or against the built-in simulator), the metrics, and
then the intake web app and/or the worker, handing each only the plain values it needs.
Only this module picks concrete engines and implementations.

Shutdown order on ``stop``: the intake stops accepting (aiohttp finishes in-flight
requests within ``[server] shutdown_grace_s``) while the worker drains within
``[worker] drain_grace_s``; then the SAE client, the simulator and the store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from orchestrator.config import Settings
from orchestrator.logging import get_logger, register_secrets
from orchestrator.metrics import Metrics
from orchestrator.ops import JsonErrorAppRunner, run_job_gauges
from orchestrator.sae import (
    CallOutcome,
    CredentialsProvider,
    DefaultChainCredentials,
    SaeClient,
    StaticCredentials,
)
from orchestrator.store import Store, open_store

log = get_logger("orchestrator.app")


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What a started service tells its caller (the CLI prints the next step from it)."""

    api_url: str | None
    simulator_url: str | None
    store_engine: str
    #: With the built-in simulator only (a demo): the first `api` source's token, so the
    #: printed next step can be pasted as is. Never set against real SAE.
    demo_token: str | None = None


def sae_call_recorder(metrics: Metrics) -> Callable[[CallOutcome], None]:
    """The SAE client's ``on_call`` hook: one metric sample and one log line per call."""
    sae_log = get_logger("orchestrator.sae")

    def record(outcome: CallOutcome) -> None:
        metrics.api_calls.labels(outcome.action, outcome.code).inc()
        metrics.api_call_duration.labels(outcome.action).observe(outcome.duration_s)
        sae_log.info(
            "sae_call",
            action=outcome.action,
            http_status=outcome.http_status,
            code=outcome.code,
            request_id=outcome.request_id,
            trace_id=outcome.trace_id,
            duration_ms=round(outcome.duration_s * 1000, 1),
        )

    return record


@contextlib.asynccontextmanager
async def _sae_target(settings: Settings) -> AsyncIterator[tuple[str, str, CredentialsProvider]]:
    """(endpoint, protocol, credentials): the real SAE, or a simulator started in-process."""
    if not settings.sae.uses_builtin_simulator:
        yield settings.sae.endpoint, settings.sae.protocol, DefaultChainCredentials()
        return
    from orchestrator.simulator import SimulatorServer

    # A fresh random key pair per run: the in-process simulator is reachable on loopback,
    # and nothing but this process should be able to sign calls to it.
    key_id, secret = f"LTAIsim{secrets.token_hex(8)}", secrets.token_urlsafe(24)
    register_secrets([secret])
    async with SimulatorServer(credentials={key_id: secret}, demo=True) as sim:
        log.info("simulator_started", endpoint=sim.endpoint)
        yield sim.endpoint, "http", StaticCredentials(key_id, secret)


def _source_secrets(settings: Settings) -> list[str]:
    values: list[str] = []
    for src in settings.sources.values():
        for secret in (src.token, src.password, src.hmac_secret):
            if secret:
                values.append(secret.value)
    return values


async def run_service(
    settings: Settings,
    *,
    intake: bool,
    worker: bool,
    stop: asyncio.Event,
    on_ready: Callable[[ServiceInfo], None] | None = None,
) -> None:
    """Run intake and/or worker until ``stop`` is set, then shut down gracefully."""
    if not (intake or worker):
        raise ValueError("run_service needs intake, worker or both")
    register_secrets(_source_secrets(settings))
    metrics = Metrics()
    # The configured budget, from every process (an API alone included) so the dashboard's
    # budget line does not drop to 0 when only API processes are up.
    metrics.api_budget_per_minute.set(settings.sae.calls_per_minute)
    tuning = {}
    if not settings.store.url.startswith("sqlite"):
        # A worker leases up to 2 x concurrency jobs and each may hold a connection for a
        # write (heartbeat, claim, retry schedule); intake needs a few more.
        tuning["max_size"] = 2 * settings.worker.concurrency + 8
    store = open_store(settings.store.url, **tuning)
    # SQLite is the zero-set-up default: create or upgrade its schema on start. PostgreSQL
    # is shared by several processes, so its schema changes only through `migrate`.
    await store.open(migrate=store.engine == "sqlite")
    try:
        async with _sae_target(settings) as (endpoint, protocol, credentials):
            client = SaeClient(
                region=settings.sae.region,
                endpoint=endpoint,
                protocol=protocol,
                api_style=settings.sae.api_style,
                connect_timeout_s=settings.sae.connect_timeout_s,
                read_timeout_s=settings.sae.read_timeout_s,
                max_connections=max(100, settings.worker.concurrency * 2),
                credentials=credentials,
                on_call=sae_call_recorder(metrics),
            )
            async with client:
                simulator_url = (
                    f"http://{endpoint}" if settings.sae.uses_builtin_simulator else None
                )
                await _run_parts(
                    settings,
                    store,
                    client,
                    metrics,
                    intake=intake,
                    worker=worker,
                    stop=stop,
                    on_ready=on_ready,
                    simulator_url=simulator_url,
                )
    finally:
        await store.close()


async def _run_parts(
    settings: Settings,
    store: Store,
    client: SaeClient,
    metrics: Metrics,
    *,
    intake: bool,
    worker: bool,
    stop: asyncio.Event,
    on_ready: Callable[[ServiceInfo], None] | None,
    simulator_url: str | None,
) -> None:
    if intake:
        from orchestrator.intake import build_intake_app

        web_app = build_intake_app(
            store,
            metrics,
            settings.sources,
            max_body_bytes=settings.server.max_body_bytes,
            default_region=settings.sae.region,
        )
    else:
        # A worker-only process still answers scrapes and probes on [server] host:port.
        from orchestrator.ops import build_ops_app

        web_app = build_ops_app(store, metrics)
    runner = JsonErrorAppRunner(
        web_app,
        shutdown_timeout=settings.server.shutdown_grace_s,
        access_log=None,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(
            exc.errno,
            f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror}",
        ) from exc
    url = f"http://{settings.server.host}:{settings.server.port}"
    log.info("http_listening", url=url, api=intake)
    api_url = url if intake else None
    try:
        demo_token = None
        if simulator_url is not None:
            demo_token = next(
                (s.token.value for s in settings.sources.values() if s.kind == "api" and s.token),
                None,
            )
        info = ServiceInfo(
            api_url=api_url,
            simulator_url=simulator_url,
            store_engine=store.engine,
            demo_token=demo_token,
        )
        # Everything allocated so far lives as long as the process: move it out of the
        # collector's reach, so a full collection does not stall requests for tens of ms.
        gc.freeze()
        if on_ready is not None:
            on_ready(info)
        # Intake and worker stop side by side: the API stops accepting at once while the
        # worker drains. A worker that dies (a side task failed) cancels the intake too.
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_stop_http_when(stop, runner))
                if worker:
                    tasks.create_task(_run_worker(settings, store, client, metrics, stop))
                else:
                    # The worker refreshes the store-wide gauges where there is one; an
                    # API alone must too, or "every worker is down" would read as an empty,
                    # young queue on the dashboards and never raise the queue-age alert.
                    tasks.create_task(run_job_gauges(store, metrics, stop))
        except ExceptionGroup as group:
            # Callers (the CLI) handle our own error types; a TaskGroup wraps them.
            raise group.exceptions[0] from group
    finally:
        await runner.cleanup()


async def _stop_http_when(stop: asyncio.Event, runner: web.AppRunner) -> None:
    await stop.wait()
    log.info("http_stopping")
    await runner.cleanup()


async def _run_worker(
    settings: Settings, store: Store, client: SaeClient, metrics: Metrics, stop: asyncio.Event
) -> None:
    from orchestrator.worker import Worker, WorkerConfig

    config = WorkerConfig(
        owner=f"{socket.gethostname()}:{os.getpid()}",
        concurrency=settings.worker.concurrency,
        lease_s=settings.worker.lease_s,
        max_attempts=settings.worker.max_attempts,
        drain_grace_s=settings.worker.drain_grace_s,
        breaker_failures=settings.worker.breaker_failures,
        breaker_open_s=settings.worker.breaker_open_s,
        retry_initial_s=settings.retry.initial_s,
        retry_max_interval_s=settings.retry.max_interval_s,
        retry_max_elapsed_s=settings.retry.max_elapsed_s,
        verify_enabled=settings.verify.enabled,
        verify_poll_interval_s=settings.verify.poll_interval_s,
        verify_timeout_s=settings.verify.timeout_s,
        calls_per_minute=settings.sae.calls_per_minute,
        retention_s=settings.store.retention_days * 86400,
    )
    await Worker(store, client, metrics, config).run(stop)

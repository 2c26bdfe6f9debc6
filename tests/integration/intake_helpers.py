"""Helpers for the intake tests: a served intake app on a real store, and payload builders.

``serve_intake`` starts ``build_intake_app`` on a free loopback port with a real store (a
tmp SQLite file or a fresh PostgreSQL schema from ``tests.contract.engines``); ``Api``
sends requests to it over real HTTP. Nothing is mocked.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from orchestrator.config import SourceSettings, parse_settings
from orchestrator.intake import build_intake_app
from orchestrator.metrics import Metrics
from orchestrator.store import Store
from tests.contract.engines import Engine

BOT_TOKEN = "bot-token-0123456789"
OPS_TOKEN = "ops-token-0123456789"
AM_TOKEN = "am-token-0123456789"
AM_LIMITED_TOKEN = "am-limited-token-0123"
AM_PASSWORD = "am-password-0123456789"
GF_SECRET = "grafana-hmac-secret-0123"
SLOW_TOKEN = "slow-token-0123456789"
SLOW_AM_TOKEN = "slow-am-token-01234567"

SOURCES: dict[str, dict[str, Any]] = {
    "bot": {"kind": "api", "token": BOT_TOKEN, "rate_per_s": 1000, "burst": 1000},
    "ops": {"kind": "api", "token": OPS_TOKEN, "allowed_apps": ["app-ok"]},
    "am": {
        "kind": "alertmanager",
        "token": AM_TOKEN,
        "cancel_on_resolved": True,
        "rate_per_s": 1000,
        "burst": 1000,
    },
    "am-basic": {"kind": "alertmanager", "username": "am", "password": AM_PASSWORD},
    "am-limited": {"kind": "alertmanager", "token": AM_LIMITED_TOKEN, "allowed_apps": ["app-ok"]},
    "gf": {"kind": "grafana", "hmac_secret": GF_SECRET, "dry_run": True},
    "slow": {"kind": "api", "token": SLOW_TOKEN, "rate_per_s": 0.01, "burst": 2},
    "slow-am": {"kind": "alertmanager", "token": SLOW_AM_TOKEN, "rate_per_s": 0.01, "burst": 1},
}


def make_sources(raw: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, SourceSettings]:
    """SourceSettings built by the real config parser."""
    return dict(parse_settings({"sources": dict(raw or SOURCES)}).sources)


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass
class Api:
    """A served intake app, its store and metrics, and a client session."""

    http: aiohttp.ClientSession
    base: str
    store: Store
    metrics: Metrics
    engine: Engine

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request; JSON bodies are parsed, anything else returned as text."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.base + path, data=data, headers=sent) as resp:
            text = await resp.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return Reply(resp.status, dict(resp.headers), body)

    def counter(self, source: str, outcome: str) -> float:
        """Current value of sae_rollback_intake_requests_total{source, outcome}."""
        value = self.metrics.registry.get_sample_value(
            "sae_rollback_intake_requests_total", {"source": source, "outcome": outcome}
        )
        return value or 0.0

    async def job_count(self) -> int:
        """Jobs in the store (every status)."""
        total, cursor = 0, None
        while True:
            page = await self.store.list_jobs(limit=1000, cursor=cursor)
            total += len(page.items)
            if page.next_cursor is None:
                return total
            cursor = page.next_cursor

    async def rejections(self) -> list[dict[str, Any]]:
        """Audit rows of refused requests (``rejected``), oldest first."""
        if self.engine.name == "sqlite":
            path = self.engine.url.removeprefix("sqlite:///")
            conn = sqlite3.connect(path)
            try:
                rows = conn.execute(
                    "SELECT actor, detail FROM audit_events WHERE event = 'rejected' ORDER BY id"
                ).fetchall()
            finally:
                conn.close()
            return [{"actor": actor, **json.loads(detail)} for actor, detail in rows]
        conn2 = await asyncpg.connect(
            self.engine.url, server_settings={"search_path": self.engine.tuning["schema"]}
        )
        try:
            records = await conn2.fetch(
                "SELECT actor, detail::text AS detail FROM audit_events "
                "WHERE event = 'rejected' ORDER BY id"
            )
        finally:
            await conn2.close()
        return [{"actor": r["actor"], **json.loads(r["detail"])} for r in records]


@asynccontextmanager
async def serve_intake(
    engine: Engine,
    *,
    sources: Mapping[str, SourceSettings] | None = None,
    max_body_bytes: int = 64 * 1024,
    store_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[Api]:
    """The intake app on a free loopback port over a migrated store on ``engine``."""
    store = await engine.opened(**dict(store_options or {}))
    metrics = Metrics(CollectorRegistry())
    app = build_intake_app(
        store,
        metrics,
        sources if sources is not None else make_sources(),
        max_body_bytes=max_body_bytes,
        default_region="cn-hangzhou",
        **options,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            yield Api(http, f"http://127.0.0.1:{port}", store, metrics, engine)
    finally:
        await runner.cleanup()
        await store.close()


def alert(
    *,
    app_id: str | None = "app-1",
    change_order_id: str | None = None,
    status: str = "firing",
    starts_at: str = "2024-05-01T10:00:00.5Z",
    name: str = "HighErrorRate",
    **labels: str,
) -> dict[str, Any]:
    """One Alertmanager alert naming the given target in its labels."""
    all_labels = {"alertname": name, **labels}
    if app_id is not None:
        all_labels["sae_app_id"] = app_id
    if change_order_id is not None:
        all_labels["sae_change_order_id"] = change_order_id
    return {
        "status": status,
        "labels": all_labels,
        "annotations": {"summary": "error rate above 5%"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2024-05-01T11:00:00Z",
        "generatorURL": "http://prometheus.invalid/graph",
    }


def group(*alerts: dict[str, Any], version: str = "4", **extra: Any) -> dict[str, Any]:
    """An alert group around ``alerts`` (Alertmanager v4 unless told otherwise)."""
    statuses = {a.get("status") for a in alerts}
    body: dict[str, Any] = {
        "version": version,
        "groupKey": '{}:{alertname="HighErrorRate"}',
        "truncatedAlerts": 0,
        "status": "firing" if "firing" in statuses else "resolved",
        "receiver": "sae-rollback",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": list(alerts),
    }
    body.update(extra)
    return body

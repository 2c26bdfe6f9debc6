"""Schemathesis against /openapi.json: no 5xx, and every answer matches the document.

The intake runs for real (aiohttp on a loopback port, SQLite store) in a background thread,
because schemathesis drives it with blocking ``requests`` calls. Requests are authenticated
(an ``api`` source's bearer token; the ``am`` source's token for its webhook) so generation
reaches the handlers instead of stopping at 401. Examples per operation are bounded to keep
the run to seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import positive_data_acceptance

from orchestrator.intake import build_intake_app
from orchestrator.intake.openapi import build_document
from orchestrator.metrics import Metrics
from orchestrator.store import open_store
from tests.integration.intake_helpers import AM_TOKEN, BOT_TOKEN, make_sources

schema = schemathesis.openapi.from_dict(build_document())


class BackgroundIntake:
    """The intake app and its store on their own event loop in a daemon thread."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.base_url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="intake-under-test", daemon=True)

    def __enter__(self) -> BackgroundIntake:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the intake did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the test through __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        store = open_store(f"sqlite:///{self.db}")
        await store.open(migrate=True)
        app = build_intake_app(
            store,
            Metrics(CollectorRegistry()),
            make_sources(),
            max_body_bytes=64 * 1024,
            default_region="cn-hangzhou",
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await store.close()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    """One keep-alive session for every generated request."""
    with requests.Session() as session:
        session.trust_env = False  # loopback only: never through a proxy
        yield session


@pytest.fixture(scope="module")
def intake_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of an intake served from a background thread for the whole module."""
    with BackgroundIntake(tmp_path_factory.mktemp("schemathesis") / "store.db") as served:
        yield served.base_url


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_matches_its_openapi_document(
    case: schemathesis.Case, intake_url: str, http: requests.Session
) -> None:
    """Generated requests (valid and invalid) never get a 5xx and always a documented answer."""
    token = BOT_TOKEN
    if case.path_parameters and "source" in case.path_parameters:
        case.path_parameters["source"] = "am"
        token = AM_TOKEN
    excluded = []
    if case.query and "cursor" in case.query:
        # A cursor is opaque and server-issued: a made-up one is rightly refused (400) even
        # though any string fits the schema; every other check still applies.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(
        base_url=intake_url,
        session=http,
        headers={"Authorization": f"Bearer {token}"},
        excluded_checks=excluded,
        timeout=10,
    )

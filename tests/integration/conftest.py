"""Shared fixtures for tests that talk to the SAE simulator over real loopback sockets.

* ``simulator``: a started :class:`SimulatorServer` on a free port with the test credentials.
* ``sim_control``: a small typed client for the ``/_sim/*`` control API.
* ``signed``: a minimal ACS3-HMAC-SHA256 client built on :mod:`orchestrator.sae.signer`, for
  requests the official SDK cannot be made to send (replayed nonces, stale dates, raw bodies).

The official SDK honours ``HTTP(S)_PROXY``; every test here runs with proxy variables unset.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from yarl import URL

from orchestrator.sae import signer
from orchestrator.simulator import SimulatorServer

TEST_ACCESS_KEY_ID = "LTAI5tTESTONLYAKID00000"
TEST_ACCESS_KEY_SECRET = "TestOnlySecretDoNotUse0000000000"
TEST_SEED = 20240501

_PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback only: the SDK's HTTP layer would otherwise route through a proxy."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatorServer]:
    """A simulator on a free loopback port with the test access key, seeded."""
    server = SimulatorServer(
        credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}, seed=TEST_SEED
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class ManualClock:
    """A clock for ``SimulatorServer(clock=...)`` that moves only when told: no sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the simulated world forward."""
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock starting at the current wall time."""
    return ManualClock()


@pytest.fixture
async def clocked_simulator(clock: ManualClock) -> AsyncIterator[SimulatorServer]:
    """Like ``simulator``, but its world (rollbacks, busy windows) follows ``clock``."""
    async with SimulatorServer(
        credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}, seed=TEST_SEED, clock=clock
    ) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session, closed after the test, that never re-sends a request.

    aiohttp silently re-sends an idempotent request (PUT, GET) once when the connection drops,
    which would turn a ``reset`` fault into a replayed nonce (see test_simulator_faults.py);
    there is no public switch, so the private flag is cleared as orchestrator.sae does.
    """
    async with aiohttp.ClientSession() as session:
        session._retry_connection = False
        yield session


class ControlError(AssertionError):
    """A control call answered with a non-2xx status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"control call failed: HTTP {status}: {body!r}")
        self.status = status
        self.body = body


class SimControl:
    """Typed helpers over the simulator's ``/_sim/*`` control endpoints."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def request(
        self, method: str, path: str, json: Any = None, *, data: bytes | None = None
    ) -> tuple[int, Any]:
        """One raw control call: ``(status, parsed JSON body)``."""
        async with self.session.request(
            method, f"{self.base_url}/_sim{path}", json=json, data=data
        ) as response:
            return response.status, await response.json()

    async def _ok(self, method: str, path: str, json: Any = None) -> Any:
        status, body = await self.request(method, path, json)
        if not 200 <= status < 300:
            raise ControlError(status, body)
        return body

    async def create_change_order(
        self,
        app_id: str,
        change_order_id: str | None = None,
        *,
        status: int | None = None,
        rollback_s: float | None = None,
        support_rollback: bool | None = None,
        co_type: str | None = None,
    ) -> str:
        """Create a change order (and its app); returns its id."""
        body: dict[str, Any] = {"app_id": app_id}
        for name, value in (
            ("change_order_id", change_order_id),
            ("status", status),
            ("rollback_s", rollback_s),
            ("support_rollback", support_rollback),
            ("co_type", co_type),
        ):
            if value is not None:
                body[name] = value
        created = await self._ok("POST", "/change-orders", body)
        return str(created["change_order_id"])

    async def change_order(self, change_order_id: str) -> dict[str, Any]:
        """The control view of one change order."""
        quoted = URL.build(path="/" + change_order_id).raw_path
        result: dict[str, Any] = await self._ok("GET", f"/change-orders{quoted}")
        return result

    async def set_busy(self, app_id: str, seconds: float) -> None:
        """Make ``app_id`` busy with another change for ``seconds``."""
        await self._ok("POST", f"/apps/{app_id}/busy", {"seconds": seconds})

    async def add_fault(self, **fault: Any) -> dict[str, Any]:
        """Post one fault (fields as in ``POST /_sim/faults``)."""
        result: dict[str, Any] = (await self._ok("POST", "/faults", fault))["fault"]
        return result

    async def faults(self) -> list[dict[str, Any]]:
        """Pending faults."""
        result: list[dict[str, Any]] = (await self._ok("GET", "/faults"))["faults"]
        return result

    async def clear_faults(self) -> None:
        """Drop every pending fault."""
        await self._ok("DELETE", "/faults")

    async def calls(self, **filters: str) -> list[dict[str, Any]]:
        """Recorded API calls, optionally filtered by action/change_order_id/app_id."""
        query = "&".join(f"{k}={signer.percent_encode(v)}" for k, v in filters.items())
        result: list[dict[str, Any]] = (
            await self._ok("GET", f"/calls?{query}" if query else "/calls")
        )["calls"]
        return result

    async def reset(self) -> None:
        """Forget apps, orders, calls and faults."""
        await self._ok("POST", "/reset")


@pytest.fixture
def sim_control(simulator: SimulatorServer, http: aiohttp.ClientSession) -> SimControl:
    """Control helper bound to the ``simulator`` fixture."""
    return SimControl(http, simulator.base_url)


@dataclass(frozen=True)
class SignedResponse:
    """What a signed call got back."""

    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        """The body parsed as JSON."""
        import json

        return json.loads(self.text)


def sae_now() -> str:
    """The current time in ``x-acs-date`` format."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SignedClient:
    """Sends ACS3-HMAC-SHA256-signed requests the way the SDK does, with every knob exposed."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        access_key_id: str = TEST_ACCESS_KEY_ID,
        access_key_secret: str = TEST_ACCESS_KEY_SECRET,
    ) -> None:
        self.session = session
        self.endpoint = endpoint
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret

    def build(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        body: bytes = b"",
        action: str = "AbortAndRollbackChangeOrder",
        date: str | None = None,
        nonce: str | None = None,
        security_token: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        secret: str | None = None,
    ) -> tuple[str, dict[str, str]]:
        """The encoded URL and the signed headers for one request."""
        headers = {
            "host": self.endpoint,
            "x-acs-version": "2019-05-06",
            "x-acs-action": action,
            "user-agent": "sae-rollback-tests",
            "x-acs-date": date or sae_now(),
            "x-acs-signature-nonce": nonce or secrets.token_hex(16),
            "accept": "application/json",
            "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
        }
        if security_token is not None:
            headers["x-acs-accesskey-id"] = self.access_key_id
            headers["x-acs-security-token"] = security_token
        if body:
            headers["content-type"] = "application/json; charset=utf-8"
        headers.update(extra_headers or {})
        query = dict(query or {})
        headers["Authorization"] = signer.sign_request(
            method,
            path,
            query,
            headers,
            body,
            self.access_key_id,
            secret if secret is not None else self.access_key_secret,
        )
        raw_query = "&".join(
            f"{signer.percent_encode(k)}={signer.percent_encode(v)}" for k, v in query.items()
        )
        return f"http://{self.endpoint}{path}" + (f"?{raw_query}" if raw_query else ""), headers

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> SignedResponse:
        """Send a request exactly as built (no re-encoding of the URL)."""
        async with self.session.request(
            method, URL(url, encoded=True), headers=headers, data=body
        ) as response:
            return SignedResponse(response.status, dict(response.headers), await response.text())

    async def call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        **options: Any,
    ) -> SignedResponse:
        """Build, sign and send one request."""
        url, headers = self.build(method, path, query, **options)
        return await self.send(method, url, headers, options.get("body", b""))

    async def abort(self, change_order_id: str, **options: Any) -> SignedResponse:
        """AbortAndRollbackChangeOrder on the current path."""
        return await self.call(
            "PUT",
            "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder",
            {"ChangeOrderId": change_order_id},
            **options,
        )

    async def describe(self, change_order_id: str, **options: Any) -> SignedResponse:
        """DescribeChangeOrder."""
        return await self.call(
            "GET",
            "/pop/v1/sam/changeorder/DescribeChangeOrder",
            {"ChangeOrderId": change_order_id},
            action="DescribeChangeOrder",
            **options,
        )


@pytest.fixture
def signed(simulator: SimulatorServer, http: aiohttp.ClientSession) -> SignedClient:
    """A signing client for the ``simulator`` fixture with the test access key."""
    return SignedClient(http, simulator.endpoint)

"""SaeClient over real sockets against the simulator: every error class and every fault mode."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from orchestrator.sae import (
    SaeBusy,
    SaeClient,
    SaeNotRunning,
    SaePermanentError,
    SaeServerError,
    SaeThrottled,
    SaeTransportError,
    StaticCredentials,
    TransportKind,
    is_ambiguous,
    is_retryable,
)
from orchestrator.sae.models import CallOutcome
from orchestrator.simulator import SimulatorServer

AK = "LTAI5tTESTONLYAKID00000"
SECRET = "TestOnlySecretDoNotUse0000000000"
STS_AK = "STS.TESTONLYTEMPKEY0001"
STS_SECRET = "TestOnlyStsSecret000000000000000"
STS_TOKEN = "TestOnlyStsToken+/=CAIS"

ClientFactory = Callable[..., SaeClient]


class Control:
    """The simulator's unsigned /_sim control API, over plain aiohttp."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def _send(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, f"{self.base_url}{path}", json=body) as response:
            payload = await response.json()
            assert response.status == 200, payload
            return payload

    async def change_order(self, app_id: str, **fields: Any) -> str:
        payload = await self._send("POST", "/_sim/change-orders", {"app_id": app_id, **fields})
        return str(payload["change_order_id"])

    async def busy(self, app_id: str, seconds: float) -> None:
        await self._send("POST", f"/_sim/apps/{app_id}/busy", {"seconds": seconds})

    async def fault(self, **fields: Any) -> None:
        await self._send("POST", "/_sim/faults", fields)

    async def calls(self, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        payload = await self._send("GET", f"/_sim/calls?{query}")
        return list(payload["calls"])

    async def order(self, change_order_id: str) -> dict[str, Any]:
        return dict(await self._send("GET", f"/_sim/change-orders/{change_order_id}"))


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    """A simulator on a free loopback port knowing one AK pair and one STS key with its token."""
    server = SimulatorServer(
        credentials={AK: SECRET, STS_AK: STS_SECRET},
        security_tokens={STS_AK: STS_TOKEN},
        seed=11,
    )
    async with server:
        yield server


@pytest.fixture
async def control(sim: SimulatorServer) -> AsyncIterator[Control]:
    """Control API helper for ``sim``."""
    async with aiohttp.ClientSession() as session:
        yield Control(session, sim.base_url)


@pytest.fixture
async def make_client(sim: SimulatorServer) -> AsyncIterator[ClientFactory]:
    """Builds opened SaeClients pointed at ``sim``; closes them all afterwards."""
    clients: list[SaeClient] = []

    def factory(
        credentials: StaticCredentials | None = None,
        endpoint: str | None = None,
        **kwargs: Any,
    ) -> SaeClient:
        values: dict[str, Any] = {"connect_timeout_s": 2.0, "read_timeout_s": 5.0}
        values.update(kwargs)
        client = SaeClient(
            region="cn-hangzhou",
            endpoint=endpoint or sim.endpoint,
            protocol="http",
            credentials=credentials or StaticCredentials(AK, SECRET),
            **values,
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


async def _opened(client: SaeClient) -> SaeClient:
    await client.open()
    return client


async def _raises(call: Awaitable[Any], error_type: type[Exception]) -> Any:
    with pytest.raises(error_type) as info:
        await call
    return info.value


# --- success and the typed reads --------------------------------------------------------------


async def test_successful_abort_ids_match_simulator_record(
    make_client: ClientFactory, control: Control
) -> None:
    """An accepted abort returns the RequestId/TraceId the simulator recorded for that call."""
    seen: list[CallOutcome] = []
    co = await control.change_order("app-ok", rollback_s=0.3)
    client = await _opened(make_client(on_call=seen.append))
    result = await client.abort_and_rollback(co)
    assert result.change_order_id == co
    (call,) = await control.calls(action="AbortAndRollbackChangeOrder")
    assert call["accepted"] is True
    assert call["access_key_id"] == AK
    assert result.outcome.request_id == call["request_id"]
    assert result.outcome.trace_id == call["trace_id"]
    assert result.outcome.trace_id is not None
    assert result.outcome.http_status == 200
    assert result.outcome.code == "Success"
    assert seen == [result.outcome]


async def test_rollback_progress_is_visible_through_the_reads(
    make_client: ClientFactory, control: Control
) -> None:
    """After the abort the order runs (1), then ends terminated (6); all reads are typed."""
    co = await control.change_order("app-reads", rollback_s=0.3)
    client = await _opened(make_client())
    await client.abort_and_rollback(co)
    during = await client.describe_change_order(co)
    assert during.status == 1
    assert during.app_id == "app-reads"
    assert during.pipelines
    app = await client.describe_application_status("app-reads")
    assert app.last_change_order_id == co
    assert app.last_change_order_running is True
    await asyncio.sleep(0.4)
    after = await client.describe_change_order(co)
    assert after.status == 6
    assert after.is_terminal
    app = await client.describe_application_status("app-reads")
    assert app.last_change_order_running is False
    page = await client.list_change_orders("app-reads", co_status=6)
    assert [item.change_order_id for item in page.items] == [co]
    assert page.total_size == 1
    empty = await client.list_change_orders("app-reads", co_status=1)
    assert empty.items == ()


async def test_list_change_orders_pages(make_client: ClientFactory, control: Control) -> None:
    """Paging parameters reach the simulator and the paging fields come back typed."""
    for _ in range(3):
        await control.change_order("app-pages", status=2)
    client = await _opened(make_client())
    first = await client.list_change_orders("app-pages", page=1, page_size=2)
    second = await client.list_change_orders("app-pages", page=2, page_size=2)
    assert (first.current_page, first.page_size, first.total_size) == (1, 2, 3)
    assert len(first.items) == 2
    assert len(second.items) == 1
    ids = {item.change_order_id for item in first.items + second.items}
    assert len(ids) == 3


async def test_special_characters_in_id_are_signed_and_routed(
    make_client: ClientFactory, control: Control
) -> None:
    """An id with space, slash, plus, star and é verifies and reaches the right order."""
    co = await control.change_order("app-special", change_order_id="abc 123/é+~*")
    client = await _opened(make_client())
    result = await client.abort_and_rollback(co)
    assert result.change_order_id == "abc 123/é+~*"
    order = await client.describe_change_order("abc 123/é+~*")
    assert order.change_order_id == "abc 123/é+~*"


async def test_legacy_v5_path_with_json_body(make_client: ClientFactory, control: Control) -> None:
    """api_style legacy-v5 aborts through /pop/v5/... with the id in a signed JSON body."""
    co = await control.change_order("app-legacy")
    client = await _opened(make_client(api_style="legacy-v5"))
    result = await client.abort_and_rollback(co)
    assert result.change_order_id == co
    (call,) = await control.calls(action="AbortAndRollbackChangeOrder")
    assert call["path"] == "/pop/v5/changeorder/ChangeOrderAbortAndRollback"
    assert call["change_order_id"] == co
    assert call["accepted"] is True


async def test_sts_token_is_accepted_and_a_wrong_one_refused(
    make_client: ClientFactory, control: Control
) -> None:
    """STS credentials with the right token succeed; a wrong token is a permanent error."""
    co = await control.change_order("app-sts")
    good = await _opened(make_client(StaticCredentials(STS_AK, STS_SECRET, STS_TOKEN)))
    result = await good.abort_and_rollback(co)
    assert result.outcome.code == "Success"
    bad = await _opened(make_client(StaticCredentials(STS_AK, STS_SECRET, "WrongToken")))
    error = await _raises(bad.describe_change_order(co), SaePermanentError)
    assert error.code.startswith("InvalidSecurityToken")
    assert "WrongToken" not in str(error)


async def test_many_concurrent_calls_share_one_session(
    make_client: ClientFactory, control: Control
) -> None:
    """Fifty concurrent calls over the shared session all verify (fresh nonce each)."""
    co = await control.change_order("app-many", status=2)
    client = await _opened(make_client())
    results = await asyncio.gather(*(client.describe_change_order(co) for _ in range(50)))
    assert {r.status for r in results} == {2}
    assert len({r.outcome.request_id for r in results}) == 50


# --- answered errors --------------------------------------------------------------------------


async def test_busy_app_answers_busy(make_client: ClientFactory, control: Control) -> None:
    """An app held by another change answers Application.ChangerOrderRunning: SaeBusy."""
    co = await control.change_order("app-busy")
    await control.busy("app-busy", 30)
    client = await _opened(make_client())
    error = await _raises(client.abort_and_rollback(co), SaeBusy)
    assert error.code == "Application.ChangerOrderRunning"
    assert error.http_status == 400
    assert is_retryable(error)
    assert not is_ambiguous(error)
    (call,) = await control.calls(action="AbortAndRollbackChangeOrder")
    assert call["request_id"] == error.request_id
    assert call["trace_id"] == error.trace_id


async def test_second_abort_is_not_running(make_client: ClientFactory, control: Control) -> None:
    """Aborting an order whose rollback already started answers SaeNotRunning."""
    co = await control.change_order("app-twice", rollback_s=5)
    client = await _opened(make_client())
    await client.abort_and_rollback(co)
    error = await _raises(client.abort_and_rollback(co), SaeNotRunning)
    assert error.code == "Application.ChangerOrder.Not.Running"
    assert not is_retryable(error)


async def test_unknown_change_order_and_app_are_permanent(make_client: ClientFactory) -> None:
    """Unknown change order and unknown app are permanent errors with their codes."""
    client = await _opened(make_client())
    order_error = await _raises(client.abort_and_rollback("no-such-order"), SaePermanentError)
    assert order_error.code == "InvalidChangeOrder.NotFound"
    app_error = await _raises(client.describe_application_status("no-such-app"), SaePermanentError)
    assert app_error.code == "InvalidAppId.NotFound"
    assert app_error.http_status == 404


async def test_wrong_secret_is_signature_mismatch(
    make_client: ClientFactory, control: Control
) -> None:
    """A wrong secret yields SignatureDoesNotMatch, a permanent error naming no secret."""
    co = await control.change_order("app-badsig")
    client = await _opened(make_client(StaticCredentials(AK, "WrongSecretCanary0000")))
    error = await _raises(client.abort_and_rollback(co), SaePermanentError)
    assert error.code == "SignatureDoesNotMatch"
    assert "WrongSecretCanary0000" not in str(error)
    assert (await control.order(co))["running"] is True


async def test_unknown_access_key_is_permanent(make_client: ClientFactory) -> None:
    """An access key id the gateway does not know: InvalidAccessKeyId.NotFound, permanent."""
    client = await _opened(make_client(StaticCredentials("LTAI5tUNKNOWNKEY", SECRET)))
    error = await _raises(client.describe_change_order("x"), SaePermanentError)
    assert error.code == "InvalidAccessKeyId.NotFound"
    assert error.http_status == 404


async def test_calls_per_minute_throttles() -> None:
    """Beyond the simulator's calls_per_minute the client sees SaeThrottled (Throttling.User)."""
    async with SimulatorServer(credentials={AK: SECRET}, calls_per_minute=2) as server:
        client = SaeClient(
            region="cn-hangzhou",
            endpoint=server.endpoint,
            protocol="http",
            credentials=StaticCredentials(AK, SECRET),
        )
        async with client:
            for _ in range(2):
                await _raises(client.describe_change_order("x"), SaePermanentError)
            error = await _raises(client.describe_change_order("x"), SaeThrottled)
    assert error.code == "Throttling.User"
    assert is_retryable(error)


async def test_error_fault_with_retry_after_is_throttled(
    make_client: ClientFactory, control: Control
) -> None:
    """An injected Throttling.Api with x-acs-retry-after sets retry_after_s (ms → s)."""
    await control.fault(code="Throttling.Api", http_status=400, retry_after_ms=1500)
    client = await _opened(make_client())
    error = await _raises(client.describe_change_order("x"), SaeThrottled)
    assert error.code == "Throttling.Api"
    assert error.retry_after_s == 1.5


@pytest.mark.parametrize(("status", "code"), [(503, "ServiceUnavailable"), (500, "InternalError")])
async def test_5xx_fault_is_ambiguous_server_error(
    make_client: ClientFactory, control: Control, status: int, code: str
) -> None:
    """503 / 500 faults raise SaeServerError, retryable and ambiguous."""
    co = await control.change_order("app-5xx")
    await control.fault(action="AbortAndRollbackChangeOrder", http_status=status)
    client = await _opened(make_client())
    error = await _raises(client.abort_and_rollback(co), SaeServerError)
    assert error.code == code
    assert error.http_status == status
    assert is_retryable(error)
    assert is_ambiguous(error)


# --- transport faults -------------------------------------------------------------------------


async def test_latency_fault_delays_but_succeeds(
    make_client: ClientFactory, control: Control
) -> None:
    """A latency-only fault slows the call; the outcome's duration shows it."""
    co = await control.change_order("app-slow", status=2)
    await control.fault(action="DescribeChangeOrder", latency_ms=300)
    client = await _opened(make_client())
    order = await client.describe_change_order(co)
    assert order.status == 2
    assert order.outcome.duration_s >= 0.29


async def test_hang_is_read_timeout_and_ambiguous(
    make_client: ClientFactory, control: Control
) -> None:
    """A hanging server ends in our read timeout: SaeTransportError(read_timeout), ambiguous."""
    co = await control.change_order("app-hang")
    await control.fault(action="AbortAndRollbackChangeOrder", mode="hang", apply=True)
    client = await _opened(make_client(read_timeout_s=0.5))
    start = time.monotonic()
    error = await _raises(client.abort_and_rollback(co), SaeTransportError)
    elapsed = time.monotonic() - start
    assert error.kind is TransportKind.READ_TIMEOUT
    assert is_ambiguous(error)
    assert error.http_status is None
    assert 0.4 <= elapsed < 3.0
    # The abort took effect although no answer came: exactly why the worker reconciles.
    (call,) = await control.calls(action="AbortAndRollbackChangeOrder")
    assert call["accepted"] is True
    order = await client.describe_change_order(co)
    assert order.status in (1, 6)


async def test_reset_is_ambiguous_transport_error(
    make_client: ClientFactory, control: Control
) -> None:
    """A connection reset without an answer is SaeTransportError(reset), ambiguous."""
    co = await control.change_order("app-reset")
    await control.fault(action="AbortAndRollbackChangeOrder", mode="reset")
    client = await _opened(make_client())
    error = await _raises(client.abort_and_rollback(co), SaeTransportError)
    assert error.kind is TransportKind.RESET
    assert is_ambiguous(error)
    # Sent exactly once: aiohttp's hidden re-send of a dropped PUT (same nonce) is off.
    calls = await control.calls(action="AbortAndRollbackChangeOrder")
    assert len(calls) == 1
    assert calls[0]["http_status"] is None
    # The client stays usable after the dropped connection.
    result = await client.abort_and_rollback(co)
    assert result.change_order_id == co


async def test_garbage_body_is_transport_error(
    make_client: ClientFactory, control: Control
) -> None:
    """An HTML 502 page from a "proxy" is SaeTransportError(bad_body) with HTTP 502."""
    co = await control.change_order("app-garbage")
    await control.fault(action="AbortAndRollbackChangeOrder", mode="garbage")
    client = await _opened(make_client())
    error = await _raises(client.abort_and_rollback(co), SaeTransportError)
    assert error.kind is TransportKind.BAD_BODY
    assert error.http_status == 502
    assert is_ambiguous(error)


async def test_connection_refused_is_not_ambiguous(make_client: ClientFactory) -> None:
    """Nobody listening: SaeTransportError(connect), retryable, and certainly not applied."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The probe is closed: nothing listens on that port now.
    client = await _opened(make_client(endpoint=f"127.0.0.1:{port}"))
    error = await _raises(client.describe_change_order("x"), SaeTransportError)
    assert error.kind is TransportKind.CONNECT
    assert is_retryable(error)
    assert not is_ambiguous(error)
    assert error.outcome.code == "Transport"

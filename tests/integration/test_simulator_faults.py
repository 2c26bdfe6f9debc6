"""Every fault mode over real HTTP: error, latency, hang, reset, garbage, and apply-then-lose."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from alibabacloud_sae20190506 import models as sae_models
from alibabacloud_sae20190506.client import Client
from alibabacloud_tea_openapi import utils_models as open_api_models
from alibabacloud_tea_openapi.exceptions import ThrottlingException

from orchestrator.simulator import SimulatorServer
from tests.integration.conftest import (
    TEST_ACCESS_KEY_ID,
    TEST_ACCESS_KEY_SECRET,
    SignedClient,
    SimControl,
)

ABORT = "AbortAndRollbackChangeOrder"
ABORT_PATH = "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder"


async def test_error_fault_answers_503_once_then_normal(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """A bare fault fails the next call with a 503 gateway body; the call after is normal."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault()
    failed = await signed.abort(order_id)
    assert failed.status == 503
    body = failed.json()
    assert body["Code"] == "ServiceUnavailable"
    assert "TraceId" not in body
    assert (await sim_control.change_order(order_id))["aborted_at"] is None
    assert (await signed.abort(order_id)).status == 200
    calls = await sim_control.calls()
    assert [(c["http_status"], c["fault"], c["accepted"]) for c in calls] == [
        (503, "error", False),
        (200, None, True),
    ]


async def test_error_fault_hits_only_its_action_and_count(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """An action-scoped fault with count 2 skips other actions and fails exactly two calls."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault(action=ABORT, code="System.Upgrading", count=2)
    assert (await signed.describe(order_id)).status == 200
    first, second = await signed.abort(order_id), await signed.abort(order_id)
    for response in (first, second):
        body = response.json()
        assert (response.status, body["Code"], body["ErrorCode"]) == (
            400,
            "System.Upgrading",
            "System.Upgrading",
        )
        assert body["Success"] is False
        assert body["TraceId"]  # a business error carries the SAE envelope
    assert await sim_control.faults() == []
    assert (await signed.abort(order_id)).status == 200


async def test_fault_can_target_one_change_order(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """A fault with change_order_id leaves calls on other orders alone."""
    await sim_control.create_change_order("app-a", "co-a")
    await sim_control.create_change_order("app-b", "co-b")
    await sim_control.add_fault(change_order_id="co-b", http_status=500)
    assert (await signed.abort("co-a")).status == 200
    failed = await signed.abort("co-b")
    assert (failed.status, failed.json()["Code"]) == (500, "InternalError")


async def test_throttling_fault_with_retry_after_reaches_the_sdk(
    simulator: SimulatorServer, sim_control: SimControl
) -> None:
    """code Throttling.User with retry_after_ms sets x-acs-retry-after; the SDK's
    ThrottlingException carries it."""
    await sim_control.add_fault(code="Throttling.User", retry_after_ms=1500)
    client = Client(
        open_api_models.Config(
            access_key_id=TEST_ACCESS_KEY_ID,
            access_key_secret=TEST_ACCESS_KEY_SECRET,
            endpoint=simulator.endpoint,
            protocol="http",
        )
    )
    with pytest.raises(ThrottlingException) as exc_info:
        await client.abort_and_rollback_change_order_async(
            sae_models.AbortAndRollbackChangeOrderRequest(change_order_id="x")
        )
    assert exc_info.value.code == "Throttling.User"
    assert exc_info.value.retry_after == 1500
    assert exc_info.value.status_code == 400


async def test_latency_fault_delays_then_answers_normally(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """latency_ms alone delays the answer, which is then the normal one."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault(latency_ms=300)
    started = time.monotonic()
    response = await signed.abort(order_id)
    elapsed = time.monotonic() - started
    assert response.status == 200
    assert elapsed >= 0.29
    [call] = await sim_control.calls()
    assert (call["fault"], call["accepted"]) == ("latency", True)


async def test_latency_fault_applies_even_if_the_client_gives_up(
    signed: SignedClient, sim_control: SimControl, http: aiohttp.ClientSession
) -> None:
    """Like a real server, a delayed abort still takes effect after the client's read timeout."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault(latency_ms=400)
    url, headers = signed.build("PUT", ABORT_PATH, {"ChangeOrderId": order_id})
    with pytest.raises(asyncio.TimeoutError):
        async with http.put(
            url, headers=headers, timeout=aiohttp.ClientTimeout(sock_read=0.1)
        ) as response:
            await response.read()
    async with asyncio.timeout(10):  # the server finishes the delayed call on its own
        while (await sim_control.change_order(order_id))["aborted_at"] is None:
            await asyncio.sleep(0.05)
    [call] = await sim_control.calls()
    assert call["accepted"] is True


async def test_hang_fault_never_answers(
    signed: SignedClient, sim_control: SimControl, http: aiohttp.ClientSession
) -> None:
    """mode hang holds the call until the client gives up; without apply nothing happens."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault(mode="hang")
    url, headers = signed.build("PUT", ABORT_PATH, {"ChangeOrderId": order_id})
    with pytest.raises(asyncio.TimeoutError):
        async with http.put(
            url, headers=headers, timeout=aiohttp.ClientTimeout(sock_read=0.3)
        ) as response:
            await response.read()
    [call] = await sim_control.calls()
    assert (call["fault"], call["http_status"], call["code"], call["accepted"]) == (
        "hang",
        None,
        None,
        False,
    )
    assert (await sim_control.change_order(order_id))["aborted_at"] is None
    assert (await signed.abort(order_id)).status == 200


async def test_hang_ends_when_the_server_stops(http: aiohttp.ClientSession) -> None:
    """Stopping the simulator releases a hanging call promptly: the connection closes."""
    server = SimulatorServer(credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET})
    await server.start()
    try:
        await SimControl(http, server.base_url).add_fault(mode="hang")
        pending = asyncio.create_task(SignedClient(http, server.endpoint).abort("x"))
        await asyncio.sleep(0.2)
        assert not pending.done()
    finally:
        started = time.monotonic()
        await server.stop()
    assert time.monotonic() - started < 2.0
    with pytest.raises(aiohttp.ClientConnectionError):
        await pending


async def test_hang_is_bounded_by_hang_max_s(http: aiohttp.ClientSession) -> None:
    """A hang lasts at most hang_max_s, then the connection is closed without an answer."""
    async with SimulatorServer(
        credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}, hang_max_s=0.3
    ) as server:
        await SimControl(http, server.base_url).add_fault(mode="hang")
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientConnectionError):
            await SignedClient(http, server.endpoint).abort("x")
        assert 0.25 <= time.monotonic() - started < 3.0


async def test_reset_fault_drops_the_connection(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """mode reset closes the connection without any response."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault(mode="reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await signed.abort(order_id)
    [call] = await sim_control.calls()
    assert (call["fault"], call["http_status"], call["accepted"]) == ("reset", None, False)
    assert (await sim_control.change_order(order_id))["aborted_at"] is None
    assert (await signed.abort(order_id)).status == 200


async def test_aiohttp_default_resend_after_a_reset_replays_the_nonce(
    simulator: SimulatorServer, sim_control: SimControl
) -> None:
    """A default aiohttp session resends a dropped PUT byte for byte; the simulator, like SAE,
    then answers SignatureNonceUsed. Why clients must disable that hidden retry."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault(mode="reset", apply=True)
    async with aiohttp.ClientSession() as default_session:
        response = await SignedClient(default_session, simulator.endpoint).abort(order_id)
    assert (response.status, response.json()["Code"]) == (400, "SignatureNonceUsed")
    calls = await sim_control.calls(action=ABORT)
    assert [(c["fault"], c["accepted"], c["code"]) for c in calls] == [
        ("reset", True, None),
        (None, False, "SignatureNonceUsed"),
    ]


async def test_garbage_fault_answers_an_html_502(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """mode garbage answers a proxy's HTML 502 page instead of JSON."""
    await sim_control.add_fault(mode="garbage")
    response = await signed.describe("x")
    assert response.status == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.text.startswith("<html>")
    assert "502 Bad Gateway" in response.text
    [call] = await sim_control.calls()
    assert (call["fault"], call["http_status"], call["code"]) == ("garbage", 502, None)


@pytest.mark.parametrize(
    ("fault", "expect_status"),
    [({"mode": "reset"}, None), ({"mode": "garbage"}, 502), ({"http_status": 503}, 503)],
)
async def test_apply_true_takes_effect_and_loses_only_the_answer(
    signed: SignedClient,
    sim_control: SimControl,
    fault: dict[str, object],
    expect_status: int | None,
) -> None:
    """With apply the abort is accepted even though the client gets no (good) answer."""
    order_id = await sim_control.create_change_order("app", rollback_s=30)
    await sim_control.add_fault(action=ABORT, apply=True, **fault)
    if expect_status is None:
        with pytest.raises(aiohttp.ClientConnectionError):
            await signed.abort(order_id)
    else:
        assert (await signed.abort(order_id)).status == expect_status
    [call] = await sim_control.calls()
    assert call["accepted"] is True
    assert call["http_status"] == expect_status
    state = await sim_control.change_order(order_id)
    assert state["aborted_at"] is not None
    assert state["status"] == 1
    retry = await signed.abort(order_id)
    assert (retry.status, retry.json()["Code"]) == (400, "Application.ChangerOrder.Not.Running")


async def test_apply_true_with_hang_aborts_while_the_call_hangs(
    signed: SignedClient, sim_control: SimControl, http: aiohttp.ClientSession
) -> None:
    """A hanging call with apply has already taken effect when the client times out."""
    order_id = await sim_control.create_change_order("app")
    await sim_control.add_fault(mode="hang", apply=True)
    url, headers = signed.build("PUT", ABORT_PATH, {"ChangeOrderId": order_id})
    with pytest.raises(asyncio.TimeoutError):
        async with http.put(
            url, headers=headers, timeout=aiohttp.ClientTimeout(sock_read=0.2)
        ) as response:
            await response.read()
    [call] = await sim_control.calls()
    assert call["accepted"] is True
    assert (await sim_control.change_order(order_id))["aborted_at"] is not None


async def test_apply_true_takes_effect_before_the_latency(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """With apply and a latency, the effect comes first: a second abort during the pause
    already finds the order rolling back (what a worker taking over a hung call sees)."""
    order_id = await sim_control.create_change_order("app", rollback_s=30)
    await sim_control.add_fault(action=ABORT, mode="reset", latency_ms=800, apply=True)
    slow = asyncio.create_task(signed.abort(order_id))
    await asyncio.sleep(0.2)
    assert (await sim_control.change_order(order_id))["aborted_at"] is not None
    second = await signed.abort(order_id)
    assert (second.status, second.json()["Code"]) == (400, "Application.ChangerOrder.Not.Running")
    with pytest.raises(aiohttp.ClientConnectionError):
        await slow
    assert sum(1 for call in await sim_control.calls() if call["accepted"]) == 1


async def test_faults_can_be_listed_and_cleared(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """GET lists pending faults with their remaining count; DELETE drops them all."""
    await sim_control.add_fault(action=ABORT, count=3, latency_ms=10)
    await sim_control.add_fault(mode="reset")
    pending = await sim_control.faults()
    assert [(f["mode"], f["remaining"]) for f in pending] == [(None, 3), ("reset", 1)]
    assert pending[0]["latency_ms"] == 10
    await sim_control.clear_faults()
    assert await sim_control.faults() == []
    assert (await signed.describe("x")).status == 400  # not found: no fault left


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "explode"},
        {"count": 0},
        {"action": "DeleteApplication"},
        {"http_status": 404},
        {"latency_ms": "slow"},
        {"unknown": 1},
        ["not", "an", "object"],
    ],
)
async def test_bad_fault_bodies_are_400(sim_control: SimControl, body: object) -> None:
    """Invalid fault requests are refused with the JSON error body and change nothing."""
    status, answer = await sim_control.request("POST", "/faults", body)
    assert status == 400
    assert answer["error"]["code"] == "InvalidParameter"
    assert answer["error"]["message"]
    assert await sim_control.faults() == []

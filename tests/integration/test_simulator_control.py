"""The unsigned ``/_sim/*`` control API over real HTTP: orders, busy apps, calls, reset."""

from __future__ import annotations

import time

import aiohttp
import pytest

from orchestrator.simulator import DEMO_APP_ID, SimulatorServer
from tests.integration.conftest import (
    TEST_ACCESS_KEY_ID,
    TEST_ACCESS_KEY_SECRET,
    ManualClock,
    SignedClient,
    SimControl,
)


async def test_created_order_has_the_contract_defaults(sim_control: SimControl) -> None:
    """Without options an order is running (1) with a 1 s rollback and a generated id."""
    status, created = await sim_control.request("POST", "/change-orders", {"app_id": "app"})
    assert status == 200
    order_id = created["change_order_id"]
    assert len(order_id) == 36
    state = await sim_control.change_order(order_id)
    assert state == created
    assert (state["app_id"], state["status"], state["rollback_s"], state["running"]) == (
        "app",
        1,
        1.0,
        True,
    )
    assert (state["support_rollback"], state["co_type"], state["aborted_at"]) == (
        True,
        "CoDeploy",
        None,
    )


async def test_order_state_follows_the_rollback(
    clocked_simulator: SimulatorServer, clock: ManualClock, http: aiohttp.ClientSession
) -> None:
    """GET /_sim/change-orders/{id} shows 1 during the rollback and 6 with finished_at after."""
    control = SimControl(http, clocked_simulator.base_url)
    order_id = await control.create_change_order("app", rollback_s=30)
    assert (await SignedClient(http, clocked_simulator.endpoint).abort(order_id)).status == 200
    clock.advance(29.9)
    during = await control.change_order(order_id)
    assert (during["status"], during["running"], during["finished_at"]) == (1, True, None)
    clock.advance(0.1)
    after = await control.change_order(order_id)
    assert (after["status"], after["status_name"], after["running"]) == (6, "ABORT", False)
    assert after["finished_at"] == pytest.approx(after["aborted_at"] + 30)


async def test_second_running_order_for_an_app_is_409(sim_control: SimControl) -> None:
    """SAE runs one change order per app: a second live one is refused with 409."""
    await sim_control.create_change_order("app", "co-1")
    status, body = await sim_control.request(
        "POST", "/change-orders", {"app_id": "app", "change_order_id": "co-2"}
    )
    assert status == 409
    assert body["error"]["code"] == "Application.ChangerOrderRunning"
    status, body = await sim_control.request(
        "POST", "/change-orders", {"app_id": "other", "change_order_id": "co-1", "status": 2}
    )
    assert (status, body["error"]["code"]) == (409, "Conflict")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"app_id": ""},
        {"app_id": 5},
        {"app_id": "a", "status": 4},
        {"app_id": "a", "status": True},
        {"app_id": "a", "rollback_s": -1},
        {"app_id": "a", "rollback_s": "1"},
        {"app_id": "a", "support_rollback": "no"},
        {"app_id": "a", "change_order_id": 7},
        {"app_id": "a", "colour": "red"},
        ["app_id"],
    ],
)
async def test_bad_change_order_bodies_are_400(sim_control: SimControl, body: object) -> None:
    """Invalid order requests get the JSON error body and create nothing."""
    status, answer = await sim_control.request("POST", "/change-orders", body)
    assert status == 400
    assert set(answer["error"]) == {"code", "message"}
    assert await sim_control.calls() == []
    status, _ = await sim_control.request("GET", "/apps/a")
    assert status == 404


async def test_non_json_control_body_is_400(sim_control: SimControl) -> None:
    """A control body that is not JSON is a 400 with the JSON error body, not a traceback."""
    status, answer = await sim_control.request("POST", "/change-orders", data=b"{oops")
    assert (status, answer["error"]["code"]) == (400, "InvalidParameter")


async def test_unknown_order_is_404(sim_control: SimControl) -> None:
    """GET of an order that does not exist is 404 with the JSON error body."""
    status, answer = await sim_control.request("GET", "/change-orders/nope")
    assert (status, answer["error"]["code"]) == (404, "NotFound")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "NotFound"),
        ("DELETE", "/change-orders", 405, "MethodNotAllowed"),
        ("PUT", "/faults", 405, "MethodNotAllowed"),
    ],
)
async def test_unknown_control_route_is_a_json_error(
    sim_control: SimControl, method: str, path: str, status: int, code: str
) -> None:
    """A control path or method that does not exist answers the JSON error body, not text."""
    answer_status, answer = await sim_control.request(method, path)
    assert (answer_status, answer["error"]["code"]) == (status, code)
    assert await sim_control.calls() == []  # control traffic is never an API call


async def test_busy_window_answers_changer_order_running_then_releases(
    clocked_simulator: SimulatorServer, clock: ManualClock, http: aiohttp.ClientSession
) -> None:
    """POST /_sim/apps/{app}/busy makes aborts answer ChangerOrderRunning for N seconds."""
    control = SimControl(http, clocked_simulator.base_url)
    signed = SignedClient(http, clocked_simulator.endpoint)
    order_id = await control.create_change_order("app")
    await control.set_busy("app", 60)
    busy = await signed.abort(order_id)
    assert (busy.status, busy.json()["Code"]) == (400, "Application.ChangerOrderRunning")
    clock.advance(59.9)
    assert (await signed.abort(order_id)).status == 400
    clock.advance(0.1)
    assert (await signed.abort(order_id)).status == 200


@pytest.mark.parametrize("body", [{}, {"seconds": "5"}, {"seconds": -1}, {"seconds": True}])
async def test_bad_busy_bodies_are_400(sim_control: SimControl, body: object) -> None:
    """The busy endpoint wants a non-negative number of seconds."""
    status, answer = await sim_control.request("POST", "/apps/app/busy", body)
    assert (status, answer["error"]["code"]) == (400, "InvalidParameter")


async def test_app_view_lists_orders_and_the_last_one(sim_control: SimControl) -> None:
    """GET /_sim/apps/{app} shows its orders and the one DescribeApplicationStatus reports."""
    old = await sim_control.create_change_order("app", status=2)
    live = await sim_control.create_change_order("app")
    status, app = await sim_control.request("GET", "/apps/app")
    assert status == 200
    assert app["change_order_ids"] == [old, live]
    assert app["last_change_order_id"] == live


async def test_calls_are_filtered_and_cleared(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """GET /_sim/calls filters by action and change order; DELETE empties the log."""
    first = await sim_control.create_change_order("app-1")
    second = await sim_control.create_change_order("app-2")
    await signed.abort(first)
    await signed.describe(second)
    await signed.abort(second)
    assert len(await sim_control.calls()) == 3
    aborts = await sim_control.calls(action="AbortAndRollbackChangeOrder")
    assert [c["change_order_id"] for c in aborts] == [first, second]
    assert all(c["accepted"] for c in aborts)
    assert [c["action"] for c in await sim_control.calls(change_order_id=second)] == [
        "DescribeChangeOrder",
        "AbortAndRollbackChangeOrder",
    ]
    status, _ = await sim_control.request("DELETE", "/calls")
    assert status == 200
    assert await sim_control.calls() == []


async def test_reset_forgets_everything(signed: SignedClient, sim_control: SimControl) -> None:
    """POST /_sim/reset drops orders, calls and faults."""
    order_id = await sim_control.create_change_order("app")
    await signed.describe(order_id)
    await sim_control.add_fault(mode="reset")
    await sim_control.reset()
    assert await sim_control.calls() == []
    assert await sim_control.faults() == []
    status, _ = await sim_control.request("GET", f"/change-orders/{order_id}")
    assert status == 404
    await sim_control.create_change_order("app")  # no running order left for the app


async def test_healthz(sim_control: SimControl) -> None:
    """GET /_sim/healthz answers ok."""
    assert await sim_control.request("GET", "/healthz") == (200, {"status": "ok"})


async def test_demo_mode_has_demo_app_with_a_running_order(
    http: aiohttp.ClientSession,
) -> None:
    """demo=True starts with demo-app holding one running change order and one finished."""
    async with SimulatorServer(
        credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}, demo=True, seed=3
    ) as sim:
        control = SimControl(http, sim.base_url)
        status, app = await control.request("GET", f"/apps/{DEMO_APP_ID}")
        assert status == 200
        assert len(app["change_order_ids"]) == 2
        live = await control.change_order(app["last_change_order_id"])
        assert (live["status"], live["running"]) == (1, True)
        response = await SignedClient(http, sim.endpoint).abort(live["change_order_id"])
        assert response.status == 200


async def test_injected_clock_drives_the_world_not_the_signature_window(
    http: aiohttp.ClientSession,
) -> None:
    """With a fake clock a year ahead, signed calls still verify and the rollback finishes
    when the fake clock says so, without sleeping."""
    fake_now = [time.time() + 365 * 86400]
    async with SimulatorServer(
        credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}, clock=lambda: fake_now[0]
    ) as sim:
        control = SimControl(http, sim.base_url)
        order_id = await control.create_change_order("app", rollback_s=600)
        assert (await SignedClient(http, sim.endpoint).abort(order_id)).status == 200
        assert (await control.change_order(order_id))["status"] == 1
        fake_now[0] += 600
        assert (await control.change_order(order_id))["status"] == 6
        [call] = await control.calls()
        assert call["at"] == fake_now[0] - 600


def test_server_does_no_io_before_start() -> None:
    """Constructing a SimulatorServer binds nothing; endpoint is unavailable until start()."""
    server = SimulatorServer()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.endpoint
    assert "not started" in repr(server)

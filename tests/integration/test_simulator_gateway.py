"""The simulator's gateway behaviour over real HTTP: signatures, dates, nonces, routes, throttling.

Requests are signed by the test helper in conftest (the project's signer), so each test can
send exactly the malformed or replayed request it is about.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from orchestrator.simulator import SimulatorServer
from tests.integration.conftest import (
    TEST_ACCESS_KEY_ID,
    TEST_ACCESS_KEY_SECRET,
    SignedClient,
    SignedResponse,
    SimControl,
)

ABORT_PATH = "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder"
LEGACY_PATH = "/pop/v5/changeorder/ChangeOrderAbortAndRollback"
LIST_PATH = "/pop/v1/sam/changeorder/ListChangeOrders"
DESCRIBE_PATH = "/pop/v1/sam/changeorder/DescribeChangeOrder"
GATEWAY_KEYS = {"RequestId", "HostId", "Code", "Message", "Recommend"}
BUSINESS_KEYS = GATEWAY_KEYS | {"ErrorCode", "TraceId", "Success", "Data"}


def error_of(response: SignedResponse) -> tuple[int, str]:
    """(HTTP status, body Code) of an answer."""
    return response.status, response.json()["Code"]


def date_offset(seconds: float) -> str:
    """An x-acs-date ``seconds`` away from now."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_success_body_has_the_documented_envelope(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """A success is 200 JSON with Code "200", Success, an upper-hex RequestId and a TraceId."""
    order_id = await sim_control.create_change_order("app")
    response = await signed.abort(order_id)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["Code"] == "200"
    assert body["Success"] is True
    assert body["Data"] == {"ChangeOrderId": order_id}
    assert re.fullmatch(r"[0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}", body["RequestId"])
    assert re.fullmatch(r"[0-9a-f]{30}", body["TraceId"])


async def test_replayed_nonce_is_refused(signed: SignedClient, sim_control: SimControl) -> None:
    """The same signed request sent twice is SignatureNonceUsed the second time."""
    order_id = await sim_control.create_change_order("app")
    url, headers = signed.build(
        "GET", DESCRIBE_PATH, {"ChangeOrderId": order_id}, action="DescribeChangeOrder"
    )
    first = await signed.send("GET", url, headers)
    replay = await signed.send("GET", url, headers)
    assert first.status == 200
    assert error_of(replay) == (400, "SignatureNonceUsed")
    assert set(replay.json()) == GATEWAY_KEYS


@pytest.mark.parametrize("offset_s", [-16 * 60, 16 * 60])
async def test_date_more_than_15_minutes_off_is_expired(
    signed: SignedClient, sim_control: SimControl, offset_s: int
) -> None:
    """x-acs-date 16 minutes in the past or future is InvalidTimeStamp.Expired."""
    order_id = await sim_control.create_change_order("app")
    response = await signed.abort(order_id, date=date_offset(offset_s))
    assert error_of(response) == (400, "InvalidTimeStamp.Expired")
    assert (await sim_control.change_order(order_id))["aborted_at"] is None


async def test_date_within_the_window_is_accepted(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """x-acs-date 14 minutes off is still accepted."""
    order_id = await sim_control.create_change_order("app")
    assert (await signed.abort(order_id, date=date_offset(-14 * 60))).status == 200


async def test_malformed_date_is_a_format_error(signed: SignedClient) -> None:
    """An x-acs-date not in the SDK's UTC format is InvalidTimeStamp.Format."""
    response = await signed.abort("x", date="Wed, 01 May 2024 08:00:00 GMT")
    assert error_of(response) == (400, "InvalidTimeStamp.Format")


async def test_missing_or_malformed_authorization_is_incomplete(signed: SignedClient) -> None:
    """No Authorization, or one that does not parse, is IncompleteSignature (400)."""
    url, headers = signed.build("PUT", ABORT_PATH, {"ChangeOrderId": "x"})
    del headers["Authorization"]
    assert error_of(await signed.send("PUT", url, headers)) == (400, "IncompleteSignature")
    headers["Authorization"] = "ACS3-HMAC-SHA256 Credential=abc"
    assert error_of(await signed.send("PUT", url, headers)) == (400, "IncompleteSignature")


async def test_mandatory_header_left_unsigned_is_incomplete(signed: SignedClient) -> None:
    """Leaving x-acs-date out of SignedHeaders is IncompleteSignature."""
    url, headers = signed.build("PUT", ABORT_PATH, {"ChangeOrderId": "x"})
    headers["Authorization"] = headers["Authorization"].replace(";x-acs-date", "")
    assert error_of(await signed.send("PUT", url, headers)) == (400, "IncompleteSignature")


async def test_tampered_query_or_body_does_not_match(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """Changing the query after signing, or sending another body, is SignatureDoesNotMatch."""
    order_id = await sim_control.create_change_order("app")
    url, headers = signed.build("PUT", ABORT_PATH, {"ChangeOrderId": "other"})
    tampered = url.replace("other", order_id)
    assert error_of(await signed.send("PUT", tampered, headers)) == (400, "SignatureDoesNotMatch")
    url, headers = signed.build("PUT", ABORT_PATH, {"ChangeOrderId": order_id})
    response = await signed.send("PUT", url, headers, body=b'{"x": 1}')
    assert error_of(response) == (400, "SignatureDoesNotMatch")
    assert (await sim_control.change_order(order_id))["aborted_at"] is None


async def test_unknown_access_key_is_404(
    simulator: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    """A key id the simulator does not know is InvalidAccessKeyId.NotFound (404)."""
    client = SignedClient(http, simulator.endpoint, "LTAIunknown", TEST_ACCESS_KEY_SECRET)
    assert error_of(await client.abort("x")) == (404, "InvalidAccessKeyId.NotFound")


async def test_host_header_is_not_checked_strictly(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """A Host of 'http://127.0.0.1:PORT' (endpoint configured with a scheme) still verifies."""
    order_id = await sim_control.create_change_order("app")
    response = await signed.abort(order_id, extra_headers={"host": f"http://{signed.endpoint}"})
    assert response.status == 200


async def test_sts_token_is_accepted_for_a_known_key(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """With no token set configured, any signed token is accepted for a known key."""
    order_id = await sim_control.create_change_order("app")
    assert (await signed.abort(order_id, security_token="AnyToken+/=")).status == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", ABORT_PATH), ("PUT", "/pop/v1/sam/changeorder/Nope"), ("POST", "/")],
)
async def test_unknown_path_or_method_is_invalid_api(
    signed: SignedClient, sim_control: SimControl, method: str, path: str
) -> None:
    """A path or method SAE does not serve is InvalidApi.NotFound (404), and is recorded."""
    response = await signed.call(method, path, {"ChangeOrderId": "x"})
    assert error_of(response) == (404, "InvalidApi.NotFound")
    [call] = await sim_control.calls()
    assert (call["path"], call["http_status"], call["code"]) == (path, 404, "InvalidApi.NotFound")


async def test_missing_change_order_id_is_not_empty(signed: SignedClient) -> None:
    """An abort without ChangeOrderId is InvalidParameter.NotEmpty with the business envelope."""
    response = await signed.call("PUT", ABORT_PATH, {})
    assert error_of(response) == (400, "InvalidParameter.NotEmpty")
    body = response.json()
    assert set(body) == BUSINESS_KEYS
    assert body["Message"] == "You must specify the parameter ChangeOrderId."
    assert (body["Success"], body["Data"], body["ErrorCode"]) == (False, None, body["Code"])


async def test_legacy_v5_path_takes_the_id_from_a_json_body(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """PUT /pop/v5/changeorder/ChangeOrderAbortAndRollback with {"ChangeOrderId"} aborts."""
    order_id = await sim_control.create_change_order("app")
    body = json.dumps({"ChangeOrderId": order_id}).encode()
    response = await signed.call("PUT", LEGACY_PATH, body=body)
    assert response.status == 200
    assert response.json()["Data"] == {"ChangeOrderId": order_id}
    [call] = await sim_control.calls()
    assert (call["action"], call["path"], call["change_order_id"]) == (
        "AbortAndRollbackChangeOrder",
        LEGACY_PATH,
        order_id,
    )
    assert call["accepted"] is True
    again = await signed.call("PUT", LEGACY_PATH, body=body)
    assert error_of(again) == (400, "Application.ChangerOrder.Not.Running")


async def test_legacy_v5_path_accepts_the_query_and_rejects_bad_bodies(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """The legacy path also reads the query; a body that is not a JSON object is refused."""
    order_id = await sim_control.create_change_order("app")
    assert (await signed.call("PUT", LEGACY_PATH, {"ChangeOrderId": order_id})).status == 200
    not_json = await signed.call("PUT", LEGACY_PATH, body=b"ChangeOrderId=x")
    assert error_of(not_json) == (400, "InvalidParameter.WithMessage")
    missing = await signed.call("PUT", LEGACY_PATH, body=b"{}")
    assert error_of(missing) == (400, "InvalidParameter.NotEmpty")


async def test_list_rejects_non_integer_paging(
    signed: SignedClient, sim_control: SimControl
) -> None:
    """ListChangeOrders with PageSize=abc is InvalidParameter.WithMessage."""
    await sim_control.create_change_order("app")
    response = await signed.call(
        "GET", LIST_PATH, {"AppId": "app", "PageSize": "abc"}, action="ListChangeOrders"
    )
    assert error_of(response) == (400, "InvalidParameter.WithMessage")


async def test_calls_beyond_the_budget_are_throttled(http: aiohttp.ClientSession) -> None:
    """With calls_per_minute=3 the 4th signed call in a minute is Throttling.User (400)."""
    async with SimulatorServer(
        credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}, calls_per_minute=3
    ) as sim:
        client = SignedClient(http, sim.endpoint)
        statuses = [(await client.describe("nope")).status for _ in range(3)]
        assert statuses == [400, 400, 400]  # not found, but counted
        throttled = await client.describe("nope")
        assert error_of(throttled) == (400, "Throttling.User")
        body = throttled.json()
        assert set(body) == GATEWAY_KEYS
        assert body["Message"] == "Request was denied due to user flow control."
        # Unsigned control calls are not SAE calls and are never throttled.
        control = SimControl(http, sim.base_url)
        await control.create_change_order("app")
        codes = [c["code"] for c in await control.calls()]
        assert codes == ["InvalidChangeOrder.NotFound"] * 3 + ["Throttling.User"]


async def test_same_seed_gives_the_same_ids(http: aiohttp.ClientSession) -> None:
    """Two simulators with one seed answer the same calls with the same ids."""

    async def run() -> list[str]:
        async with SimulatorServer(
            credentials={TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}, seed=99
        ) as sim:
            order_id = await SimControl(http, sim.base_url).create_change_order("app")
            body = (await SignedClient(http, sim.endpoint).abort(order_id)).json()
            return [order_id, body["RequestId"], body["TraceId"]]

    first, second = await run(), await run()
    assert first == second

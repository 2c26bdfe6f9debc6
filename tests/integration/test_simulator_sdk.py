"""The official Alibaba Cloud SDK, sync and async, as an independent client of the simulator.

If the SDK cannot tell the simulator from SAE for these actions, neither can a user. The SDK's
sync client blocks, so it runs in a thread; its async client runs on the test's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from alibabacloud_sae20190506 import models as sae_models
from alibabacloud_sae20190506.client import Client
from alibabacloud_tea_openapi import utils_models as open_api_models
from alibabacloud_tea_openapi.exceptions import ClientException

from orchestrator.simulator import SimulatorServer
from tests.integration.conftest import (
    TEST_ACCESS_KEY_ID,
    TEST_ACCESS_KEY_SECRET,
    TEST_SEED,
    ManualClock,
    SimControl,
)

STS_ACCESS_KEY_ID = "STS.TESTONLYTEMPORARYKEY01"
STS_ACCESS_KEY_SECRET = "TestOnlyStsSecretDoNotUse000000"
STS_TOKEN = "TestOnlyStsToken+/=CAIS1234"
SPECIAL_ID = "abc 123/é+~*"


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[SimulatorServer]:
    """A simulator that knows a long-term key and an STS key with its one valid token; its
    world follows the manual ``clock``."""
    server = SimulatorServer(
        credentials={
            TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET,
            STS_ACCESS_KEY_ID: STS_ACCESS_KEY_SECRET,
        },
        security_tokens={STS_ACCESS_KEY_ID: STS_TOKEN},
        seed=TEST_SEED,
        clock=clock,
    )
    async with server:
        yield server


@pytest.fixture
def control(sim: SimulatorServer, http: aiohttp.ClientSession) -> SimControl:
    """Control helper bound to ``sim``."""
    return SimControl(http, sim.base_url)


def sdk_client(
    sim: SimulatorServer,
    credential: str = "access_key",
    *,
    secret: str | None = None,
    token: str | None = None,
    access_key_id: str | None = None,
) -> Client:
    """The official client pointed at the simulator (sae-api.md §5)."""
    if credential == "sts":
        key_id, key_secret, security_token = (
            STS_ACCESS_KEY_ID,
            STS_ACCESS_KEY_SECRET,
            STS_TOKEN if token is None else token,
        )
    else:
        key_id, key_secret, security_token = TEST_ACCESS_KEY_ID, TEST_ACCESS_KEY_SECRET, None
    config = open_api_models.Config(
        access_key_id=access_key_id or key_id,
        access_key_secret=secret or key_secret,
        security_token=security_token,
        endpoint=sim.endpoint,
        protocol="http",
        region_id="cn-hangzhou",
        read_timeout=10000,
        connect_timeout=5000,
    )
    return Client(config)


async def invoke(client: Client, transport: str, action: str, request: Any) -> Any:
    """Call ``action`` (snake_case SDK method) through the sync or the async client."""
    if transport == "sync":
        return await asyncio.to_thread(getattr(client, action), request)
    return await getattr(client, f"{action}_async")(request)


def abort_request(change_order_id: str) -> Any:
    """The SDK request model for AbortAndRollbackChangeOrder."""
    return sae_models.AbortAndRollbackChangeOrderRequest(change_order_id=change_order_id)


@pytest.mark.parametrize("transport", ["sync", "async"])
@pytest.mark.parametrize("credential", ["access_key", "sts"])
async def test_sdk_abort_is_accepted_and_ids_match_the_call_log(
    sim: SimulatorServer, control: SimControl, transport: str, credential: str
) -> None:
    """A signed abort succeeds; the SDK sees the RequestId/TraceId the simulator recorded."""
    order_id = await control.create_change_order("app-1")
    client = sdk_client(sim, credential)
    response = await invoke(
        client, transport, "abort_and_rollback_change_order", abort_request(order_id)
    )
    body = response.body
    assert response.status_code == 200
    assert body.success is True
    assert body.code == "200"
    assert body.data.change_order_id == order_id
    [call] = await control.calls(action="AbortAndRollbackChangeOrder")
    assert call["request_id"] == body.request_id
    assert call["trace_id"] == body.trace_id
    assert call["accepted"] is True
    assert call["access_key_id"] == (
        STS_ACCESS_KEY_ID if credential == "sts" else TEST_ACCESS_KEY_ID
    )
    assert response.headers["x-acs-request-id"] == body.request_id
    assert (await control.change_order(order_id))["aborted_at"] is not None


@pytest.mark.parametrize("transport", ["sync", "async"])
async def test_sdk_sees_busy_app_as_changer_order_running(
    sim: SimulatorServer, control: SimControl, transport: str
) -> None:
    """An abort while another change holds the app raises ClientException ChangerOrderRunning."""
    order_id = await control.create_change_order("busy-app")
    await control.set_busy("busy-app", 60)
    with pytest.raises(ClientException) as exc_info:
        await invoke(
            sdk_client(sim), transport, "abort_and_rollback_change_order", abort_request(order_id)
        )
    assert exc_info.value.code == "Application.ChangerOrderRunning"
    assert exc_info.value.status_code == 400
    [call] = await control.calls()
    assert exc_info.value.request_id == call["request_id"]
    assert exc_info.value.data["TraceId"] == call["trace_id"]
    assert exc_info.value.data["Success"] is False
    assert call["accepted"] is False


@pytest.mark.parametrize("transport", ["sync", "async"])
async def test_sdk_sees_unknown_order_as_not_found(sim: SimulatorServer, transport: str) -> None:
    """Aborting an unknown change order raises InvalidChangeOrder.NotFound (400)."""
    with pytest.raises(ClientException) as exc_info:
        await invoke(
            sdk_client(sim), transport, "abort_and_rollback_change_order", abort_request("nope")
        )
    assert (exc_info.value.code, exc_info.value.status_code) == ("InvalidChangeOrder.NotFound", 400)
    assert exc_info.value.data["ErrorCode"] == "InvalidChangeOrder.NotFound"


@pytest.mark.parametrize("transport", ["sync", "async"])
async def test_sdk_second_abort_is_not_running(
    sim: SimulatorServer, control: SimControl, transport: str
) -> None:
    """A repeated abort of the same order raises Application.ChangerOrder.Not.Running."""
    order_id = await control.create_change_order("app-2", rollback_s=30)
    client = sdk_client(sim)
    await invoke(client, transport, "abort_and_rollback_change_order", abort_request(order_id))
    with pytest.raises(ClientException) as exc_info:
        await invoke(client, transport, "abort_and_rollback_change_order", abort_request(order_id))
    assert exc_info.value.code == "Application.ChangerOrder.Not.Running"


@pytest.mark.parametrize("transport", ["sync", "async"])
@pytest.mark.parametrize("credential", ["access_key", "sts"])
async def test_sdk_with_wrong_secret_sees_signature_does_not_match(
    sim: SimulatorServer, control: SimControl, transport: str, credential: str
) -> None:
    """A wrong secret is SignatureDoesNotMatch (400), and nothing is aborted."""
    order_id = await control.create_change_order("app-3")
    client = sdk_client(sim, credential, secret="WrongSecret000000000000000000000")
    with pytest.raises(ClientException) as exc_info:
        await invoke(client, transport, "abort_and_rollback_change_order", abort_request(order_id))
    assert (exc_info.value.code, exc_info.value.status_code) == ("SignatureDoesNotMatch", 400)
    assert "server string to sign is:ACS3-HMAC-SHA256" in exc_info.value.message
    assert (await control.change_order(order_id))["aborted_at"] is None


@pytest.mark.parametrize("transport", ["sync", "async"])
async def test_sdk_with_wrong_sts_token_is_rejected(
    sim: SimulatorServer, control: SimControl, transport: str
) -> None:
    """An STS key with a token other than its own is InvalidSecurityToken.Malformed."""
    order_id = await control.create_change_order("app-4")
    client = sdk_client(sim, "sts", token="SomeOtherToken")
    with pytest.raises(ClientException) as exc_info:
        await invoke(client, transport, "abort_and_rollback_change_order", abort_request(order_id))
    assert exc_info.value.code == "InvalidSecurityToken.Malformed"


async def test_sdk_with_unknown_access_key_sees_404(sim: SimulatorServer) -> None:
    """An access key the simulator does not know is InvalidAccessKeyId.NotFound (404)."""
    client = sdk_client(sim, access_key_id="LTAI5tUNKNOWNKEY0000000")
    with pytest.raises(ClientException) as exc_info:
        await client.abort_and_rollback_change_order_async(abort_request("x"))
    assert (exc_info.value.code, exc_info.value.status_code) == ("InvalidAccessKeyId.NotFound", 404)


async def test_sdk_legacy_roa_v1_signature_is_not_supported(sim: SimulatorServer) -> None:
    """The SDK's opt-in HMAC-SHA1 ROA signature (`signature_algorithm='v2'`) is refused."""
    config = open_api_models.Config(
        access_key_id=TEST_ACCESS_KEY_ID,
        access_key_secret=TEST_ACCESS_KEY_SECRET,
        endpoint=sim.endpoint,
        protocol="http",
        signature_algorithm="v2",
    )
    with pytest.raises(ClientException) as exc_info:
        await asyncio.to_thread(Client(config).abort_and_rollback_change_order, abort_request("x"))
    assert exc_info.value.code == "IncompleteSignature"


@pytest.mark.parametrize("transport", ["sync", "async"])
async def test_sdk_models_parse_describe_list_and_status(
    sim: SimulatorServer, control: SimControl, clock: ManualClock, transport: str
) -> None:
    """DescribeChangeOrder, ListChangeOrders and DescribeApplicationStatus parse into SDK models
    and follow the order from running, through its rollback, to aborted."""
    history = await control.create_change_order("app-5", status=2)
    order_id = await control.create_change_order("app-5", rollback_s=60, co_type="CoDeploy")
    client = sdk_client(sim)

    async def describe() -> Any:
        request = sae_models.DescribeChangeOrderRequest(change_order_id=order_id)
        return (await invoke(client, transport, "describe_change_order", request)).body.data

    async def status() -> Any:
        request = sae_models.DescribeApplicationStatusRequest(app_id="app-5")
        return (await invoke(client, transport, "describe_application_status", request)).body.data

    data = await describe()
    assert (data.change_order_id, data.app_id, data.status) == (order_id, "app-5", 1)
    assert data.support_rollback is True
    assert data.co_type_code == "CoDeploy"
    assert data.pipelines[0].status == 1
    app = await status()
    assert (app.last_change_order_id, app.last_change_order_running) == (order_id, True)
    assert app.last_change_order_status == "RUNNING"

    await invoke(client, transport, "abort_and_rollback_change_order", abort_request(order_id))
    assert (await describe()).status == 1  # the rollback runs for rollback_s
    assert (await status()).last_change_order_running is True
    clock.advance(60)
    assert (await describe()).status == 6
    app = await status()
    assert (app.last_change_order_running, app.last_change_order_status) == (False, "ABORT")

    request = sae_models.ListChangeOrdersRequest(app_id="app-5", co_status="6", page_size=10)
    page = (await invoke(client, transport, "list_change_orders", request)).body.data
    assert [o.change_order_id for o in page.change_order_list] == [order_id]
    assert (page.current_page, page.page_size, page.total_size) == (1, 10, 1)
    assert page.change_order_list[0].status == 6
    request = sae_models.ListChangeOrdersRequest(
        app_id="app-5", current_page=1, page_size=1, reverse=True
    )
    page = (await invoke(client, transport, "list_change_orders", request)).body.data
    assert [o.change_order_id for o in page.change_order_list] == [history]
    assert page.total_size == 2


async def test_sdk_unknown_app_is_invalid_app_id_404(sim: SimulatorServer) -> None:
    """DescribeApplicationStatus and ListChangeOrders of an unknown app answer 404."""
    client = sdk_client(sim)
    with pytest.raises(ClientException) as status_exc:
        await client.describe_application_status_async(
            sae_models.DescribeApplicationStatusRequest(app_id="ghost")
        )
    with pytest.raises(ClientException) as list_exc:
        await asyncio.to_thread(
            client.list_change_orders, sae_models.ListChangeOrdersRequest(app_id="ghost")
        )
    for exc_info in (status_exc, list_exc):
        assert (exc_info.value.code, exc_info.value.status_code) == ("InvalidAppId.NotFound", 404)


async def test_special_character_id_survives_sync_and_async_wire_encodings(
    sim: SimulatorServer, control: SimControl
) -> None:
    """An id with space, slash, non-ASCII, plus, tilde and star verifies via requests and yarl."""
    await control.create_change_order("app-6", SPECIAL_ID, rollback_s=30)
    client = sdk_client(sim)
    request = sae_models.DescribeChangeOrderRequest(change_order_id=SPECIAL_ID)
    sync_data = (await asyncio.to_thread(client.describe_change_order, request)).body.data
    async_data = (await client.describe_change_order_async(request)).body.data
    assert sync_data.change_order_id == async_data.change_order_id == SPECIAL_ID
    response = await client.abort_and_rollback_change_order_async(abort_request(SPECIAL_ID))
    assert response.body.data.change_order_id == SPECIAL_ID
    calls = await control.calls(change_order_id=SPECIAL_ID)
    assert [c["http_status"] for c in calls] == [200, 200, 200]
    assert calls[-1]["accepted"] is True
    assert (await control.change_order(SPECIAL_ID))["status"] == 1

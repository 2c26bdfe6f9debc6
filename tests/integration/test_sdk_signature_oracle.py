"""The official SDK as oracle on the wire: its real requests, our signer and our client compared.

A loopback capture server records what the SDK (sync over requests, async over aiohttp) actually
sends. Our signer must reproduce each captured Authorization from the captured method, path,
form-decoded query, signed headers and body; our client must send the same request shape
(method, path, decoded query, the same signed header names and values) for the same action.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from alibabacloud_sae20190506 import models as sae_models
from alibabacloud_sae20190506.client import Client as SdkClient
from alibabacloud_tea_openapi import utils_models as open_api_models

from orchestrator.sae import SaeClient, StaticCredentials, signer

AK = "LTAI5tTESTONLYAKID00000"
SECRET = "TestOnlySecretDoNotUse0000000000"
TOKEN = "TestOnlyStsToken+/=CAIS"
SPECIAL_ID = "abc 123/é+~*"

_DATA: dict[str, Any] = {
    "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder": {"ChangeOrderId": SPECIAL_ID},
    "/pop/v1/sam/changeorder/DescribeChangeOrder": {
        "ChangeOrderId": SPECIAL_ID,
        "AppId": "app-1",
        "Status": 1,
        "SubStatus": 0,
        "SupportRollback": True,
        "CoTypeCode": "CoDeploy",
        "Pipelines": [{"PipelineId": "p-1", "Status": 1}],
    },
    "/pop/v1/sam/changeorder/ListChangeOrders": {
        "ChangeOrderList": [{"ChangeOrderId": "co-1", "Status": 2}],
        "CurrentPage": 1,
        "PageSize": 10,
        "TotalSize": 1,
    },
    "/pop/v1/sam/app/describeApplicationStatus": {
        "AppId": "app-1",
        "LastChangeOrderId": "co-1",
        "LastChangeOrderRunning": True,
        "LastChangeOrderStatus": "RUNNING",
        "SubStatus": "NORMAL",
    },
}


@dataclass(frozen=True)
class Captured:
    """One request as it arrived on the socket."""

    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.raw_path.partition("?")[0]

    @property
    def query(self) -> dict[str, str | None]:
        # Form decoding, as a server must: the SDK's sync client sends '+' for a space.
        return dict(parse_qsl(self.raw_path.partition("?")[2], keep_blank_values=True))

    def signed_headers(self) -> dict[str, str]:
        names = signer.parse_authorization(self.headers["authorization"]).signed_headers
        return {name: self.headers[name] for name in names}


class CaptureServer:
    """Answers every request with a success body for its path and remembers the request."""

    def __init__(self) -> None:
        self.requests: list[Captured] = []
        self.runner: web.AppRunner | None = None
        self.endpoint = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Captured(
                method=request.method,
                raw_path=request.raw_path,
                headers={name.lower(): value for name, value in request.headers.items()},
                body=await request.read(),
            )
        )
        body = {
            "RequestId": f"REQ-{len(self.requests)}",
            "TraceId": f"trace-{len(self.requests)}",
            "Code": "200",
            "Message": "success",
            "Success": True,
            "Data": _DATA.get(request.path, {}),
        }
        return web.json_response(body)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def capture() -> AsyncIterator[CaptureServer]:
    """A capture server on a free loopback port."""
    server = CaptureServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _sdk(endpoint: str, token: str | None) -> SdkClient:
    config = open_api_models.Config(
        access_key_id=AK,
        access_key_secret=SECRET,
        security_token=token,
        endpoint=endpoint,
        protocol="http",
        region_id="cn-hangzhou",
        read_timeout=10000,
        connect_timeout=5000,
    )
    return SdkClient(config)


def _ours(endpoint: str, token: str | None) -> SaeClient:
    return SaeClient(
        region="cn-hangzhou",
        endpoint=endpoint,
        protocol="http",
        credentials=StaticCredentials(AK, SECRET, token),
    )


async def _sdk_calls(sdk: SdkClient, use_async: bool) -> list[Any]:
    requests: list[tuple[str, Any]] = [
        (
            "abort_and_rollback_change_order",
            sae_models.AbortAndRollbackChangeOrderRequest(change_order_id=SPECIAL_ID),
        ),
        (
            "describe_change_order",
            sae_models.DescribeChangeOrderRequest(change_order_id=SPECIAL_ID),
        ),
        (
            "list_change_orders",
            sae_models.ListChangeOrdersRequest(
                app_id="app-1", co_status="2", current_page=1, page_size=10
            ),
        ),
        (
            "describe_application_status",
            sae_models.DescribeApplicationStatusRequest(app_id="app-1"),
        ),
    ]
    answers = []
    for name, request in requests:
        if use_async:
            answers.append(await getattr(sdk, f"{name}_async")(request))
        else:
            # The sync client blocks on requests: keep the loop (and the server) running.
            answers.append(await asyncio.to_thread(getattr(sdk, name), request))
    return answers


async def _our_calls(client: SaeClient) -> list[Any]:
    async with client:
        return [
            await client.abort_and_rollback(SPECIAL_ID),
            await client.describe_change_order(SPECIAL_ID),
            await client.list_change_orders("app-1", co_status=2, page=1, page_size=10),
            await client.describe_application_status("app-1"),
        ]


@pytest.mark.parametrize("use_async", [False, True], ids=["sdk-sync", "sdk-async"])
@pytest.mark.parametrize("token", [None, TOKEN], ids=["ak", "sts"])
async def test_our_signer_reproduces_sdk_wire_signatures(
    capture: CaptureServer, use_async: bool, token: str | None
) -> None:
    """For every captured SDK request our sign_request yields its exact Authorization."""
    await _sdk_calls(_sdk(capture.endpoint, token), use_async)
    assert len(capture.requests) == 4
    for request in capture.requests:
        expected = request.headers["authorization"]
        ours = signer.sign_request(
            request.method,
            request.path,
            request.query,
            request.signed_headers(),
            request.body,
            AK,
            SECRET,
        )
        assert ours == expected, request.raw_path


async def test_special_id_wire_encodings_differ_but_canonicalize_alike(
    capture: CaptureServer,
) -> None:
    """SDK sync, SDK async and our client encode the id differently but decode to the same."""
    sdk = _sdk(capture.endpoint, None)
    request = sae_models.DescribeChangeOrderRequest(change_order_id=SPECIAL_ID)
    await asyncio.to_thread(sdk.describe_change_order, request)
    await sdk.describe_change_order_async(request)
    async with _ours(capture.endpoint, None) as client:
        await client.describe_change_order(SPECIAL_ID)
    sync_raw, async_raw, our_raw = (r.raw_path.partition("?")[2] for r in capture.requests)
    assert our_raw == "ChangeOrderId=abc%20123%2F%C3%A9%2B~%2A"
    # The SDK sends '+' for the space (and yarl leaves '/' and '*' bare on the async path).
    assert "+" in sync_raw.partition("=")[2].partition("%")[0]
    assert sync_raw != our_raw
    assert async_raw != our_raw
    for request in capture.requests:
        assert request.query == {"ChangeOrderId": SPECIAL_ID}
        assert signer.canonical_query(request.query) == our_raw


@pytest.mark.parametrize("token", [None, TOKEN], ids=["ak", "sts"])
async def test_our_client_sends_what_the_sdk_sends(
    capture: CaptureServer, token: str | None
) -> None:
    """Same method, path, decoded query, signed header names and values (bar date, nonce, UA)."""
    await _sdk_calls(_sdk(capture.endpoint, token), use_async=True)
    sdk_requests = list(capture.requests)
    capture.requests.clear()
    await _our_calls(_ours(capture.endpoint, token))
    our_requests = list(capture.requests)
    assert len(sdk_requests) == len(our_requests) == 4
    volatile = {"x-acs-date", "x-acs-signature-nonce", "user-agent"}
    for sdk_request, our_request in zip(sdk_requests, our_requests, strict=True):
        assert our_request.method == sdk_request.method
        assert our_request.path == sdk_request.path
        assert our_request.query == sdk_request.query
        assert our_request.body == sdk_request.body == b""
        sdk_signed = sdk_request.signed_headers()
        our_signed = our_request.signed_headers()
        assert sorted(our_signed) == sorted(sdk_signed)
        for name in set(sdk_signed) - volatile:
            assert our_signed[name] == sdk_signed[name], name
        assert our_signed["user-agent"].startswith("sae-rollback/")


async def test_same_body_parses_alike_in_sdk_models_and_ours(capture: CaptureServer) -> None:
    """The SDK's models and our typed results read the same values from the same answers."""
    sdk_answers = await _sdk_calls(_sdk(capture.endpoint, None), use_async=True)
    abort, order, page, status = await _our_calls(_ours(capture.endpoint, None))
    sdk_abort, sdk_order, sdk_page, sdk_status = (answer.body for answer in sdk_answers)
    assert abort.change_order_id == sdk_abort.data.change_order_id
    assert order.status == sdk_order.data.status
    assert order.support_rollback == sdk_order.data.support_rollback
    assert [p.pipeline_id for p in order.pipelines] == [
        p.pipeline_id for p in sdk_order.data.pipelines
    ]
    assert [i.change_order_id for i in page.items] == [
        i.change_order_id for i in sdk_page.data.change_order_list
    ]
    assert page.total_size == sdk_page.data.total_size
    assert status.last_change_order_id == sdk_status.data.last_change_order_id
    assert status.last_change_order_running == sdk_status.data.last_change_order_running

"""SaeClient against a fake transport: wire shape, signing, parsing, classification, secrecy."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from alibabacloud_credentials.client import Client as CredentialClient
from alibabacloud_credentials.provider.static_sts import StaticSTSCredentialsProvider
from alibabacloud_credentials.utils import auth_util
from structlog.testing import capture_logs

from orchestrator.errors import ConfigError
from orchestrator.sae import signer
from orchestrator.sae.client import USER_AGENT, SaeClient
from orchestrator.sae.credentials import (
    Credentials,
    CredentialsError,
    DefaultChainCredentials,
    StaticCredentials,
)
from orchestrator.sae.errors import (
    SaeBusy,
    SaeNotRunning,
    SaePermanentError,
    SaeServerError,
    SaeThrottled,
    SaeTransportError,
    TransportKind,
    is_ambiguous,
    is_retryable,
)
from orchestrator.sae.models import CallOutcome, Classification
from orchestrator.sae.transport import (
    AiohttpTransport,
    HttpRequest,
    HttpResponse,
    TransportFailure,
)

AK = "LTAI5tTESTONLYAKID00000"
SECRET = "TestOnlySecretDoNotUse0000000000"
CANARY_SECRET = "CANARY-SECRET-6f1d2b7e"
CANARY_TOKEN = "CANARY-TOKEN-93ac/+=="

ABORT_PATH = "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder"


def _ok(data: object = None, **extra: object) -> dict[str, Any]:
    body: dict[str, Any] = {
        "RequestId": "91F93257-7A4A-4BD3-9A7E-2F6EAE6D0001",
        "Message": "success",
        "TraceId": "0a98a02315955564772843261e0001",
        "Data": data,
        "ErrorCode": "success",
        "Code": "200",
        "Success": True,
    }
    body.update(extra)
    return body


class FakeTransport:
    """Records requests; answers each with the next scripted response or raises it."""

    def __init__(self, *answers: HttpResponse | Exception | dict[str, Any]) -> None:
        self.answers = list(answers)
        self.requests: list[HttpRequest] = []

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, dict):
            return HttpResponse(
                200, {"content-type": "application/json"}, json.dumps(answer).encode()
            )
        return answer


def _client(
    transport: FakeTransport,
    credentials: StaticCredentials | None = None,
    **kw: Any,
) -> SaeClient:
    return SaeClient(
        region="cn-hangzhou",
        credentials=credentials or StaticCredentials(AK, SECRET),
        transport=transport,
        **kw,
    )


def _verify(request: HttpRequest, secret: str) -> signer.ParsedAuthorization:
    """Verify a captured request as the simulator does: recompute from SignedHeaders."""
    parts = urlsplit(request.url)
    query: dict[str, str | None] = dict(parse_qsl(parts.query, keep_blank_values=True))
    parsed = signer.parse_authorization(request.headers["Authorization"])
    canonical = signer.canonical_request(
        request.method,
        parts.path,
        query,
        request.headers,
        parsed.signed_headers,
        signer.payload_sha256(request.body),
    )
    assert signer.signature(secret, signer.string_to_sign(canonical)) == parsed.signature
    assert request.headers["x-acs-content-sha256"] == hashlib.sha256(request.body).hexdigest()
    return parsed


def _error_response(status: int, code: str, **extra: object) -> HttpResponse:
    body = {
        "RequestId": "REQ-ERR",
        "Code": code,
        "ErrorCode": code,
        "Message": "msg",
        "TraceId": "trace-err",
        "Success": False,
        "Data": None,
    }
    body.update(extra)
    return HttpResponse(status, {}, json.dumps(body).encode())


# --- wire shape of each action --------------------------------------------------------------


async def test_abort_current_style_puts_id_in_query_without_body() -> None:
    """Current style: PUT /pop/v1/sam/.../AbortAndRollbackChangeOrder?ChangeOrderId=…, no body."""
    transport = FakeTransport(_ok({"ChangeOrderId": "co-1"}))
    async with _client(transport) as client:
        result = await client.abort_and_rollback("co-1")
    (request,) = transport.requests
    assert request.method == "PUT"
    assert request.url == f"https://sae.cn-hangzhou.aliyuncs.com{ABORT_PATH}?ChangeOrderId=co-1"
    assert request.body == b""
    assert "content-type" not in request.headers
    assert result.change_order_id == "co-1"
    assert result.outcome.code == "Success"
    assert result.outcome.http_status == 200
    assert result.outcome.request_id == "91F93257-7A4A-4BD3-9A7E-2F6EAE6D0001"
    assert result.outcome.trace_id == "0a98a02315955564772843261e0001"
    assert result.outcome.classification is None


async def test_every_sent_header_is_signed_like_the_sdk() -> None:
    """The SDK's header set is sent and every header but Authorization is in SignedHeaders."""
    transport = FakeTransport(_ok({"ChangeOrderId": "co-1"}))
    async with _client(transport) as client:
        await client.abort_and_rollback("co-1")
    (request,) = transport.requests
    parsed = _verify(request, SECRET)
    sent = {name.lower() for name in request.headers} - {"authorization"}
    assert set(parsed.signed_headers) == sent
    assert sent == {
        "host",
        "x-acs-version",
        "x-acs-action",
        "user-agent",
        "x-acs-date",
        "x-acs-signature-nonce",
        "accept",
        "x-acs-content-sha256",
        "x-acs-credentials-provider",
    }
    headers = request.headers
    assert headers["host"] == "sae.cn-hangzhou.aliyuncs.com"
    assert headers["x-acs-version"] == "2019-05-06"
    assert headers["x-acs-action"] == "AbortAndRollbackChangeOrder"
    assert headers["user-agent"] == USER_AGENT
    assert USER_AGENT.startswith("sae-rollback/")
    assert headers["accept"] == "application/json"
    assert headers["x-acs-content-sha256"] == signer.EMPTY_BODY_SHA256
    assert headers["x-acs-credentials-provider"] == "static_ak"
    assert parsed.access_key_id == AK


async def test_special_change_order_id_is_encoded_on_the_wire_as_signed() -> None:
    """An id with space, slash, plus, star and é travels RFC 3986-encoded, exactly as signed."""
    transport = FakeTransport(_ok({"ChangeOrderId": "abc 123/é+~*"}))
    async with _client(transport) as client:
        await client.abort_and_rollback("abc 123/é+~*")
    (request,) = transport.requests
    assert request.url.endswith("?ChangeOrderId=abc%20123%2F%C3%A9%2B~%2A")
    _verify(request, SECRET)


async def test_abort_legacy_v5_sends_json_body_with_signed_hash() -> None:
    """legacy-v5: PUT /pop/v5/changeorder/ChangeOrderAbortAndRollback, JSON body hash signed."""
    transport = FakeTransport(_ok({"ChangeOrderId": "co-9"}))
    async with _client(transport, api_style="legacy-v5") as client:
        result = await client.abort_and_rollback("co-9")
    (request,) = transport.requests
    assert request.method == "PUT"
    assert request.url == (
        "https://sae.cn-hangzhou.aliyuncs.com/pop/v5/changeorder/ChangeOrderAbortAndRollback"
    )
    assert json.loads(request.body) == {"ChangeOrderId": "co-9"}
    assert request.headers["content-type"] == "application/json; charset=utf-8"
    assert request.headers["x-acs-content-sha256"] == hashlib.sha256(request.body).hexdigest()
    assert request.headers["x-acs-content-sha256"] != signer.EMPTY_BODY_SHA256
    parsed = _verify(request, SECRET)
    assert "content-type" in parsed.signed_headers
    assert result.change_order_id == "co-9"


async def test_describe_change_order_request_and_typed_result() -> None:
    """DescribeChangeOrder is a GET with the id in the query; Data becomes a typed ChangeOrder."""
    data = {
        "ChangeOrderId": "co-1",
        "AppId": "app-1",
        "AppName": "demo",
        "Status": "1",
        "SubStatus": 0,
        "SupportRollback": True,
        "CoType": "Deploy",
        "CoTypeCode": "CoDeploy",
        "CreateTime": "2020-12-17 21:06:45",
        "ErrorMessage": "",
        "BatchCount": 2,
        "BatchType": "auto",
        "BatchWaitTime": 1,
        "Auto": "true",
        "CurrentPipelineId": "p-1",
        "Pipelines": [
            {
                "PipelineId": "p-1",
                "PipelineName": "Batch 1",
                "Status": 1,
                "StartTime": 1600000000000,
            },
            {"PipelineId": "p-2", "Status": 0, "SomethingNew": {"x": 1}},
        ],
        "UnknownField": [1, 2, 3],
    }
    transport = FakeTransport(_ok(data))
    async with _client(transport) as client:
        order = await client.describe_change_order("co-1")
    (request,) = transport.requests
    assert request.method == "GET"
    assert request.url.endswith("/pop/v1/sam/changeorder/DescribeChangeOrder?ChangeOrderId=co-1")
    assert request.headers["x-acs-action"] == "DescribeChangeOrder"
    _verify(request, SECRET)
    assert order.change_order_id == "co-1"
    assert order.app_id == "app-1"
    assert order.status == 1
    assert order.sub_status == 0
    assert order.support_rollback is True
    assert order.co_type_code == "CoDeploy"
    assert order.auto is True
    assert order.error_message == ""
    assert not order.is_terminal
    assert [p.pipeline_id for p in order.pipelines] == ["p-1", "p-2"]
    assert order.pipelines[0].start_time_ms == 1600000000000
    assert order.outcome.action == "DescribeChangeOrder"


async def test_describe_change_order_tolerates_pipelines_object_and_missing_fields() -> None:
    """Pipelines as a single object (old docs) parses; missing fields become None."""
    data = {"ChangeOrderId": "co-2", "Status": 6, "Pipelines": {"PipelineId": "p-only"}}
    transport = FakeTransport(_ok(data))
    async with _client(transport) as client:
        order = await client.describe_change_order("co-2")
    assert order.status == 6
    assert order.is_terminal
    assert [p.pipeline_id for p in order.pipelines] == ["p-only"]
    assert order.app_id is None
    assert order.support_rollback is None


async def test_list_change_orders_query_and_paging() -> None:
    """ListChangeOrders sends AppId, CoStatus and paging; items and paging are typed."""
    data = {
        "CurrentPage": 2,
        "PageSize": "10",
        "TotalSize": 11,
        "ChangeOrderList": [
            {"ChangeOrderId": "co-a", "Status": 1, "CoTypeCode": "CoDeploy", "AppId": "app-1"},
            {"ChangeOrderId": "co-b", "Status": 2, "Source": "console"},
        ],
    }
    transport = FakeTransport(_ok(data))
    async with _client(transport) as client:
        page = await client.list_change_orders("app-1", co_status=1, page=2, page_size=10)
    (request,) = transport.requests
    assert request.method == "GET"
    parts = urlsplit(request.url)
    assert parts.path == "/pop/v1/sam/changeorder/ListChangeOrders"
    assert dict(parse_qsl(parts.query)) == {
        "AppId": "app-1",
        "CoStatus": "1",
        "CurrentPage": "2",
        "PageSize": "10",
    }
    _verify(request, SECRET)
    assert [item.change_order_id for item in page.items] == ["co-a", "co-b"]
    assert page.items[0].status == 1
    assert not page.items[0].is_terminal
    assert page.items[1].is_terminal
    assert (page.current_page, page.page_size, page.total_size) == (2, 10, 11)


async def test_list_change_orders_omits_unset_filters() -> None:
    """Without co_status the CoStatus parameter is not sent at all."""
    transport = FakeTransport(_ok({"ChangeOrderList": []}))
    async with _client(transport) as client:
        page = await client.list_change_orders("app-1")
    query = dict(parse_qsl(urlsplit(transport.requests[0].url).query))
    assert "CoStatus" not in query
    assert page.items == ()


async def test_describe_application_status_request_and_typed_result() -> None:
    """DescribeApplicationStatus GETs by AppId and types the last change order fields."""
    data = {
        "AppId": "app-1",
        "CurrentStatus": "RUNNING",
        "RunningInstances": 2,
        "LastChangeOrderId": "co-1",
        "LastChangeOrderRunning": True,
        "LastChangeOrderStatus": "RUNNING",
        "SubStatus": "RUNNING_BUT_HAS_ERROR",
    }
    transport = FakeTransport(_ok(data))
    async with _client(transport) as client:
        status = await client.describe_application_status("app-1")
    (request,) = transport.requests
    assert request.url.endswith("/pop/v1/sam/app/describeApplicationStatus?AppId=app-1")
    assert request.headers["x-acs-action"] == "DescribeApplicationStatus"
    _verify(request, SECRET)
    assert status.last_change_order_id == "co-1"
    assert status.last_change_order_running is True
    assert status.last_change_order_status == "RUNNING"
    assert status.sub_status == "RUNNING_BUT_HAS_ERROR"
    assert status.running_instances == 2


async def test_empty_last_change_order_id_is_none() -> None:
    """An empty LastChangeOrderId (none, or expired) reads as None."""
    transport = FakeTransport(_ok({"AppId": "a", "LastChangeOrderId": ""}))
    async with _client(transport) as client:
        status = await client.describe_application_status("a")
    assert status.last_change_order_id is None


async def test_code_int_and_lowercase_success_keys_parse() -> None:
    """A success body with integer Code and lower-case keys still parses as success."""
    body = {"requestId": "r-lower", "code": 200, "success": True, "data": {"ChangeOrderId": "c"}}
    transport = FakeTransport(body)
    async with _client(transport) as client:
        result = await client.abort_and_rollback("c")
    assert result.outcome.code == "Success"
    assert result.outcome.request_id == "r-lower"
    assert result.change_order_id == "c"


# --- freshness and credentials ---------------------------------------------------------------


async def test_fresh_date_and_nonce_on_every_call() -> None:
    """Each call signs a new x-acs-date (from the wall clock) and a new random nonce."""
    times = iter(datetime(2024, 5, 1, 8, 0, tzinfo=UTC) + timedelta(seconds=s) for s in range(10))
    transport = FakeTransport(_ok({"ChangeOrderId": "c"}))
    async with _client(transport, wall_clock=lambda: next(times)) as client:
        for _ in range(3):
            await client.abort_and_rollback("c")
    dates = [r.headers["x-acs-date"] for r in transport.requests]
    nonces = [r.headers["x-acs-signature-nonce"] for r in transport.requests]
    assert dates == ["2024-05-01T08:00:00Z", "2024-05-01T08:00:01Z", "2024-05-01T08:00:02Z"]
    assert len(set(nonces)) == 3
    assert all(len(n) == 32 and int(n, 16) >= 0 for n in nonces)
    signatures = {r.headers["Authorization"] for r in transport.requests}
    assert len(signatures) == 3


async def test_sts_headers_present_and_signed() -> None:
    """STS credentials add x-acs-accesskey-id and x-acs-security-token, both signed."""
    transport = FakeTransport(_ok({"ChangeOrderId": "c"}))
    credentials = StaticCredentials(AK, SECRET, security_token="TestOnlyStsToken+/=")
    async with _client(transport, credentials) as client:
        await client.abort_and_rollback("c")
    (request,) = transport.requests
    assert request.headers["x-acs-accesskey-id"] == AK
    assert request.headers["x-acs-security-token"] == "TestOnlyStsToken+/="
    assert request.headers["x-acs-credentials-provider"] == "static_sts"
    parsed = _verify(request, SECRET)
    assert {"x-acs-accesskey-id", "x-acs-security-token"} <= set(parsed.signed_headers)


async def test_credentials_are_fetched_on_every_call() -> None:
    """A rotated STS token is used by the very next call (no caching in the client)."""

    class Rotating:
        def __init__(self) -> None:
            self.calls = 0

        async def get(self) -> Credentials:
            self.calls += 1
            return Credentials(AK, SECRET, f"token-{self.calls}", "default/oidc_role_arn")

    provider = Rotating()
    transport = FakeTransport(_ok({"ChangeOrderId": "c"}))
    async with SaeClient(region="cn-hangzhou", credentials=provider, transport=transport) as c:
        await c.abort_and_rollback("c")
        await c.abort_and_rollback("c")
    tokens = [r.headers["x-acs-security-token"] for r in transport.requests]
    assert tokens == ["token-1", "token-2"]
    assert transport.requests[0].headers["x-acs-credentials-provider"] == "default/oidc_role_arn"


async def test_credentials_failure_is_a_retryable_unsent_call() -> None:
    """No credentials: SaeTransportError (kind credentials, code InvalidCredentials), nothing
    sent so not ambiguous, retryable (a metadata-service blip must not fail a rollback)."""

    class Broken:
        async def get(self) -> Credentials:
            raise CredentialsError("could not obtain Alibaba Cloud credentials: chain empty")

    seen: list[CallOutcome] = []
    transport = FakeTransport(_ok())
    client = SaeClient(
        region="cn-hangzhou", credentials=Broken(), transport=transport, on_call=seen.append
    )
    async with client:
        with pytest.raises(SaeTransportError) as info:
            await client.describe_change_order("c")
    assert transport.requests == []
    assert info.value.kind is TransportKind.CREDENTIALS
    assert info.value.code == "InvalidCredentials"
    assert info.value.http_status is None
    assert is_retryable(info.value)
    assert not is_ambiguous(info.value)
    assert "chain empty" in str(info.value)
    assert isinstance(info.value.__cause__, CredentialsError)
    assert [o.code for o in seen] == ["InvalidCredentials"]


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "error_type"),
    [
        (_error_response(400, "Application.ChangerOrderRunning"), SaeBusy),
        (_error_response(400, "Throttling.User"), SaeThrottled),
        (_error_response(503, "ServiceUnavailable"), SaeServerError),
        (_error_response(400, "Application.ChangerOrder.Not.Running"), SaeNotRunning),
        (_error_response(400, "InvalidChangeOrder.NotFound"), SaePermanentError),
        (_error_response(404, "InvalidAppId.NotFound"), SaePermanentError),
        (_error_response(400, "SignatureDoesNotMatch"), SaePermanentError),
    ],
)
async def test_error_answers_raise_classified_errors_with_outcome(
    response: HttpResponse, error_type: type[Exception]
) -> None:
    """Each error answer raises its classified type carrying ids, status, code and message."""
    seen: list[CallOutcome] = []
    async with _client(FakeTransport(response), on_call=seen.append) as client:
        with pytest.raises(error_type) as info:
            await client.abort_and_rollback("c")
    error: Any = info.value
    outcome: CallOutcome = error.outcome
    assert outcome.http_status == response.status
    assert outcome.request_id == "REQ-ERR"
    assert outcome.trace_id == "trace-err"
    assert outcome.message == "msg"
    assert outcome.code == json.loads(response.body)["Code"]
    assert outcome.classification is not None
    assert outcome.duration_s >= 0
    assert seen == [outcome]


async def test_success_false_on_http_200_raises() -> None:
    """HTTP 200 with Success false is a failure, classified by its code."""
    body = _ok(None, Success=False, ErrorCode="Application.ChangerOrderRunning")
    async with _client(FakeTransport(body)) as client:
        with pytest.raises(SaeBusy) as info:
            await client.abort_and_rollback("c")
    assert info.value.http_status == 200


async def test_html_502_from_proxy_is_ambiguous_transport_error() -> None:
    """An HTML 502 is SaeTransportError(bad_body), ambiguous, with http_status 502."""
    html = HttpResponse(502, {"content-type": "text/html"}, b"<html>502 Bad Gateway</html>")
    async with _client(FakeTransport(html)) as client:
        with pytest.raises(SaeTransportError) as info:
            await client.abort_and_rollback("c")
    assert info.value.kind is TransportKind.BAD_BODY
    assert info.value.http_status == 502
    assert is_ambiguous(info.value)


async def test_throttled_answer_honours_retry_after() -> None:
    """x-acs-retry-after (milliseconds) becomes SaeThrottled.retry_after_s."""
    response = _error_response(400, "Throttling.User")
    response = HttpResponse(400, {"x-acs-retry-after": "2500"}, response.body)
    async with _client(FakeTransport(response)) as client:
        with pytest.raises(SaeThrottled) as info:
            await client.describe_change_order("c")
    assert info.value.retry_after_s == 2.5
    assert info.value.outcome.retry_after_s == 2.5


@pytest.mark.parametrize("kind", list(TransportKind))
async def test_transport_failures_become_transport_errors(kind: TransportKind) -> None:
    """A transport failure of any kind is SaeTransportError with no status and code Transport."""
    seen: list[CallOutcome] = []
    transport = FakeTransport(TransportFailure(kind, "detail"))
    async with _client(transport, on_call=seen.append) as client:
        with pytest.raises(SaeTransportError) as info:
            await client.abort_and_rollback("c")
    assert info.value.kind is kind
    assert info.value.http_status is None
    assert info.value.code == "Transport"
    assert is_ambiguous(info.value) is kind.ambiguous
    assert seen[0].classification is Classification.TRANSPORT


async def test_no_retries_inside_the_client() -> None:
    """A retryable failure is raised after exactly one request."""
    transport = FakeTransport(_error_response(503, "ServiceUnavailable"))
    async with _client(transport) as client:
        with pytest.raises(SaeServerError):
            await client.abort_and_rollback("c")
    assert len(transport.requests) == 1


async def test_broken_on_call_hook_does_not_change_the_result() -> None:
    """An exception in the on_call hook is logged, and the accepted abort still returns."""

    def hook(outcome: CallOutcome) -> None:
        raise RuntimeError("metrics down")

    with capture_logs() as logs:
        async with _client(FakeTransport(_ok({"ChangeOrderId": "c"})), on_call=hook) as client:
            result = await client.abort_and_rollback("c")
    assert result.outcome.code == "Success"
    assert [log["event"] for log in logs] == ["sae_on_call_hook_failed"]


# --- secrets ---------------------------------------------------------------------------------


async def test_secrets_never_appear_in_reprs_messages_or_outcomes() -> None:
    """A canary secret and token appear in no repr, str, message, outcome or exception."""
    credentials = StaticCredentials(AK, CANARY_SECRET, security_token=CANARY_TOKEN)
    echo = _error_response(
        400,
        "SignatureDoesNotMatch",
        Message=f"bad signature; secret was {CANARY_SECRET} token {CANARY_TOKEN}",
    )
    seen: list[CallOutcome] = []
    transport = FakeTransport(
        echo,
        TransportFailure(TransportKind.RESET, f"peer said {CANARY_SECRET}"),
    )
    client = _client(transport, credentials, on_call=seen.append)
    texts: list[str] = [repr(credentials), str(credentials), repr(client)]
    texts += [repr(await credentials.get()), str(await credentials.get())]
    async with client:
        with pytest.raises(SaePermanentError) as first:
            await client.abort_and_rollback("c")
        with pytest.raises(SaeTransportError) as second:
            await client.abort_and_rollback("c")
    for error in (first.value, second.value):
        texts += [str(error), repr(error), repr(error.outcome), str(error.args)]
    texts += [repr(outcome) for outcome in seen]
    texts += [repr(request) for request in transport.requests]
    for text in texts:
        assert CANARY_SECRET not in text
        assert CANARY_TOKEN not in text
    assert "***" in (first.value.outcome.message or "")


def test_credentials_repr_hides_secret_and_token() -> None:
    """Credentials' repr shows the key id and provider only."""
    credentials = Credentials(AK, CANARY_SECRET, CANARY_TOKEN, "static_sts")
    assert AK in repr(credentials)
    assert CANARY_SECRET not in repr(credentials)
    assert CANARY_TOKEN not in f"{credentials}"
    assert credentials.is_sts


def test_static_credentials_need_key_and_secret() -> None:
    """An empty key id or secret is a configuration error, naming no secret."""
    with pytest.raises(CredentialsError):
        StaticCredentials("", CANARY_SECRET)
    with pytest.raises(CredentialsError) as info:
        StaticCredentials(AK, "")
    assert CANARY_SECRET not in str(info.value)


async def test_default_chain_wraps_alibabacloud_credentials_client() -> None:
    """A library credential client's answer becomes Credentials with its provider name."""
    library = CredentialClient(
        provider=StaticSTSCredentialsProvider(
            access_key_id=AK, access_key_secret=CANARY_SECRET, security_token=CANARY_TOKEN
        )
    )
    credentials = await DefaultChainCredentials(library).get()
    assert credentials.access_key_id == AK
    assert credentials.access_key_secret == CANARY_SECRET
    assert credentials.security_token == CANARY_TOKEN
    assert credentials.provider_name == "static_sts"


@pytest.fixture
def env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALIBABA_CLOUD_* env credentials, as the library read them at import time."""
    # alibabacloud_credentials reads the environment once, at import: patch what it read.
    monkeypatch.setattr(auth_util, "environment_access_key_id", AK)
    monkeypatch.setattr(auth_util, "environment_access_key_secret", CANARY_SECRET)
    monkeypatch.setattr(auth_util, "environment_security_token", None)
    # Belt and braces: should env ever fail, the chain must not reach for the ECS metadata IP.
    monkeypatch.setattr(auth_util, "environment_ecs_metadata_disabled", "true")


@pytest.mark.usefixtures("env_credentials")
async def test_default_chain_reads_environment_first() -> None:
    """With ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET set, the default chain answers from env."""
    credentials = await DefaultChainCredentials().get()
    assert credentials.access_key_id == AK
    assert credentials.provider_name == "default/env"
    assert not credentials.is_sts


async def test_default_chain_failure_is_credentials_error_without_secret() -> None:
    """A failing library client becomes CredentialsError with a clear message, no secret."""

    class Failing:
        async def get_credential_async(self) -> Any:
            raise RuntimeError("unable to load credentials from any of the providers")

    with pytest.raises(CredentialsError, match="default chain") as info:
        await DefaultChainCredentials(Failing()).get()  # type: ignore[arg-type]
    assert "unable to load credentials" in str(info.value)
    assert isinstance(info.value, ConfigError)


async def test_default_chain_empty_answer_is_credentials_error() -> None:
    """A chain that answers without a key pair is refused."""

    class Empty:
        async def get_credential_async(self) -> Any:
            return type("M", (), {"access_key_id": AK, "access_key_secret": None})()

    with pytest.raises(CredentialsError, match="no access key"):
        await DefaultChainCredentials(Empty()).get()  # type: ignore[arg-type]


# --- construction and lifecycle --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"protocol": "ftp"},
        {"api_style": "v2"},
        {"connect_timeout_s": 0},
        {"read_timeout_s": -1},
        {"endpoint": "http://127.0.0.1:8080"},
        {"endpoint": "", "region": ""},
    ],
)
def test_invalid_settings_are_config_errors(kwargs: dict[str, Any]) -> None:
    """Bad protocol, style, timeouts or endpoint raise ConfigError at construction."""
    values: dict[str, Any] = {"region": "cn-hangzhou", "credentials": StaticCredentials(AK, SECRET)}
    values.update(kwargs)
    with pytest.raises(ConfigError):
        SaeClient(**values)


async def test_endpoint_override_and_http_protocol() -> None:
    """endpoint "host:port" is used verbatim for the URL and the signed host header."""
    transport = FakeTransport(_ok({"ChangeOrderId": "c"}))
    client = _client(transport, endpoint="127.0.0.1:18080", protocol="HTTP")
    assert client.endpoint == "127.0.0.1:18080"
    async with client:
        await client.abort_and_rollback("c")
    request = transport.requests[0]
    assert request.url.startswith("http://127.0.0.1:18080/pop/v1/")
    assert request.headers["host"] == "127.0.0.1:18080"


async def test_calls_need_an_open_client() -> None:
    """Calling before open() or after close() is a programming error, not an SAE error."""
    client = _client(FakeTransport(_ok()))
    with pytest.raises(RuntimeError, match="not open"):
        await client.describe_change_order("c")
    await client.open()
    await client.close()
    with pytest.raises(RuntimeError):
        await client.describe_change_order("c")
    with pytest.raises(RuntimeError, match="closed"):
        await client.open()


async def test_empty_ids_are_rejected_before_sending() -> None:
    """An empty change order or app id never reaches SAE."""
    transport = FakeTransport(_ok())
    async with _client(transport) as client:
        with pytest.raises(ValueError, match="change_order_id"):
            await client.abort_and_rollback(" ")
        with pytest.raises(ValueError, match="app_id"):
            await client.describe_application_status("")
    assert transport.requests == []


async def test_own_session_is_created_on_open_and_closed_on_close() -> None:
    """Without injection the client creates one aiohttp session in open() and closes it."""
    client = SaeClient(region="cn-hangzhou", credentials=StaticCredentials(AK, SECRET))
    transport: Any = client._aiohttp
    assert transport._session is None  # the constructor did no I/O
    await client.open()
    session = transport._session
    assert isinstance(session, aiohttp.ClientSession)
    assert session.timeout.sock_connect == 5.0
    assert session.timeout.sock_read == 10.0
    assert session.timeout.total is not None
    # aiohttp would otherwise re-send a dropped PUT once, with the same nonce.
    assert session._retry_connection is False
    await client.close()
    assert session.closed


async def test_injected_session_is_used_and_left_open() -> None:
    """An injected aiohttp session belongs to the caller: the client does not close it."""
    async with aiohttp.ClientSession() as session:
        client = SaeClient(
            region="cn-hangzhou", credentials=StaticCredentials(AK, SECRET), session=session
        )
        async with client:
            pass
        assert not session.closed
        assert session._retry_connection is False


# --- aiohttp exception mapping ---------------------------------------------------------------


class _RaisingSession:
    """Stands in for aiohttp.ClientSession: request() raises the given exception."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def request(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


def _connector_error() -> aiohttp.ClientConnectorError:
    key: Any = type("Key", (), {"ssl": False, "host": "127.0.0.1", "port": 1})()
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


@pytest.mark.parametrize(
    ("make_exc", "kind"),
    [
        (lambda: aiohttp.ConnectionTimeoutError("connect"), TransportKind.CONNECT_TIMEOUT),
        (lambda: aiohttp.SocketTimeoutError("read"), TransportKind.READ_TIMEOUT),
        (_connector_error, TransportKind.CONNECT),
        (lambda: aiohttp.ServerDisconnectedError(), TransportKind.RESET),
        (lambda: aiohttp.ClientPayloadError("truncated"), TransportKind.RESET),
        (lambda: aiohttp.ClientOSError(104, "Connection reset by peer"), TransportKind.RESET),
        (lambda: aiohttp.ClientError("odd"), TransportKind.OTHER),
        (lambda: TimeoutError(), TransportKind.TIMEOUT),
    ],
)
async def test_aiohttp_exceptions_map_to_transport_kinds(
    make_exc: Callable[[], BaseException], kind: TransportKind
) -> None:
    """Each aiohttp failure maps to the kind that says whether the request may have been sent."""
    session: Any = _RaisingSession(make_exc())
    transport = AiohttpTransport(connect_timeout_s=1, read_timeout_s=1, session=session)
    await transport.open()
    request = HttpRequest("GET", "http://127.0.0.1:1/x", {}, b"")
    with pytest.raises(TransportFailure) as info:
        await transport(request)
    assert info.value.kind is kind
    await transport.close()

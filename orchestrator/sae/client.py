"""The async SAE change-order client: signs, sends once, and turns every answer into a typed value.

Policy lives here; I/O lives in a transport (:mod:`orchestrator.sae.transport`). Each call:

1. gets credentials from the provider (every call, so refreshed STS tokens are used);
2. builds the headers the official SDK sends, with a fresh ``x-acs-date`` and nonce, and signs
   all of them with ACS3-HMAC-SHA256 (:mod:`orchestrator.sae.signer`);
3. sends the request once: **no retries here**, the worker owns retry policy;
4. parses the answer leniently and returns a typed result, or raises the classified
   :mod:`orchestrator.sae.errors` exception. Either way a :class:`CallOutcome` is passed to the
   optional ``on_call`` hook (metrics and logging are wired through it by the composition root).

``api_style="legacy-v5"`` sends AbortAndRollbackChangeOrder to the seed's
``PUT /pop/v5/changeorder/ChangeOrderAbortAndRollback`` with a JSON body; everything else is the
current SDK's form (``/pop/v1/sam/...``, parameters in the query).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self

import aiohttp
import structlog

from orchestrator import __version__
from orchestrator.errors import ConfigError
from orchestrator.sae import signer
from orchestrator.sae.credentials import Credentials, CredentialsProvider
from orchestrator.sae.errors import (
    SaeCallError,
    SaeTransportError,
    TransportKind,
    classify,
    error_for,
    parse_retry_after,
)
from orchestrator.sae.models import (
    CODE_SUCCESS,
    CODE_TRANSPORT,
    AbortResult,
    AppStatus,
    CallOutcome,
    ChangeOrder,
    ChangeOrderPage,
    Classification,
    data_object,
    get_field,
    parse_app_status,
    parse_change_order,
    parse_change_order_page,
)
from orchestrator.sae.transport import (
    AiohttpTransport,
    HttpRequest,
    HttpResponse,
    Transport,
    TransportFailure,
)

__all__ = [
    "ABORT_AND_ROLLBACK",
    "API_VERSION",
    "DESCRIBE_APPLICATION_STATUS",
    "DESCRIBE_CHANGE_ORDER",
    "LIST_CHANGE_ORDERS",
    "USER_AGENT",
    "ApiStyle",
    "SaeClient",
    "interpret_response",
]

API_VERSION: Final = "2019-05-06"
USER_AGENT: Final = f"sae-rollback/{__version__}"

ABORT_AND_ROLLBACK: Final = "AbortAndRollbackChangeOrder"
DESCRIBE_CHANGE_ORDER: Final = "DescribeChangeOrder"
LIST_CHANGE_ORDERS: Final = "ListChangeOrders"
DESCRIBE_APPLICATION_STATUS: Final = "DescribeApplicationStatus"

_PATH_ABORT: Final = "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder"
_PATH_ABORT_LEGACY: Final = "/pop/v5/changeorder/ChangeOrderAbortAndRollback"
_PATH_DESCRIBE_CO: Final = "/pop/v1/sam/changeorder/DescribeChangeOrder"
_PATH_LIST_CO: Final = "/pop/v1/sam/changeorder/ListChangeOrders"
_PATH_APP_STATUS: Final = "/pop/v1/sam/app/describeApplicationStatus"
_JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
_CREDENTIALS_CODE: Final = "InvalidCredentials"

ApiStyle = Literal["current", "legacy-v5"]
OnCall = Callable[[CallOutcome], None]

_log = structlog.get_logger(__name__)


class SaeClient:
    """Async client for SAE's change-order API (AbortAndRollback, Describe, List, AppStatus).

    Construct with plain values (the composition root reads the ``[sae]`` config), then
    ``async with client:`` or ``await client.open()`` / ``await client.close()``. The constructor
    does no I/O. One ``aiohttp.ClientSession`` serves every call. For tests, pass ``transport``
    (any ``async (HttpRequest) -> HttpResponse``) or an existing aiohttp ``session``.
    """

    def __init__(
        self,
        *,
        region: str,
        credentials: CredentialsProvider,
        endpoint: str = "",
        protocol: str = "https",
        api_style: str = "current",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        total_timeout_s: float | None = None,
        max_connections: int = 100,
        transport: Transport | None = None,
        session: aiohttp.ClientSession | None = None,
        on_call: OnCall | None = None,
        wall_clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        protocol = protocol.lower()
        if protocol not in ("http", "https"):
            raise ConfigError(f"[sae] protocol must be 'http' or 'https', not {protocol!r}")
        if api_style not in ("current", "legacy-v5"):
            raise ConfigError(
                f"[sae] api_style must be 'current' or 'legacy-v5', not {api_style!r}"
            )
        if connect_timeout_s <= 0 or read_timeout_s <= 0:
            raise ConfigError("[sae] connect_timeout_s and read_timeout_s must be positive")
        if "://" in endpoint or "/" in endpoint:
            # The SDK would put a scheme into the signed Host header; refuse it up front.
            raise ConfigError(f"[sae] endpoint must be 'host' or 'host:port', not {endpoint!r}")
        if not endpoint and not region:
            raise ConfigError("[sae] region is required when endpoint is empty")
        if transport is not None and session is not None:
            raise ValueError("pass either transport or session, not both")
        self._region = region
        self._endpoint = endpoint or f"sae.{region}.aliyuncs.com"
        self._protocol = protocol
        self._api_style: ApiStyle = "legacy-v5" if api_style == "legacy-v5" else "current"
        self._credentials = credentials
        self._on_call = on_call
        self._wall_clock = wall_clock or _utc_now
        self._monotonic = monotonic or time.monotonic
        self._aiohttp: AiohttpTransport | None = None
        self._transport: Transport | None = transport
        if transport is None:
            self._aiohttp = AiohttpTransport(
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
                total_timeout_s=total_timeout_s,
                max_connections=max_connections,
                session=session,
            )
        self._open = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"SaeClient(endpoint={self._endpoint!r}, protocol={self._protocol!r}, "
            f"api_style={self._api_style!r})"
        )

    @property
    def endpoint(self) -> str:
        """The ``host[:port]`` calls go to (and the signed ``host`` header)."""
        return self._endpoint

    @property
    def api_style(self) -> ApiStyle:
        """``"current"`` or ``"legacy-v5"`` (only AbortAndRollbackChangeOrder differs)."""
        return self._api_style

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the shared HTTP session. Idempotent; a closed client cannot be reopened."""
        if self._closed:
            raise RuntimeError("SaeClient is closed")
        if self._open:
            return
        if self._aiohttp is not None:
            await self._aiohttp.open()
            self._transport = self._aiohttp
        self._open = True

    async def close(self) -> None:
        """Close the session this client created (an injected session stays with its owner)."""
        self._closed = True
        self._open = False
        if self._aiohttp is not None:
            await self._aiohttp.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- actions ---------------------------------------------------------------------------

    async def abort_and_rollback(self, change_order_id: str) -> AbortResult:
        """Stop a running change order and roll the app back (AbortAndRollbackChangeOrder).

        Not idempotent in outcome: after an ambiguous failure (see ``errors.is_ambiguous``)
        reconcile with :meth:`describe_change_order` before calling again.
        """
        _require("change_order_id", change_order_id)
        if self._api_style == "legacy-v5":
            body = json.dumps({"ChangeOrderId": change_order_id}, separators=(",", ":")).encode()
            outcome, answer = await self._call(
                ABORT_AND_ROLLBACK, "PUT", _PATH_ABORT_LEGACY, {}, body, _JSON_CONTENT_TYPE
            )
        else:
            outcome, answer = await self._call(
                ABORT_AND_ROLLBACK, "PUT", _PATH_ABORT, {"ChangeOrderId": change_order_id}
            )
        changed = get_field(data_object(answer), "ChangeOrderId")
        return AbortResult(
            change_order_id=str(changed) if isinstance(changed, str | int) else None,
            outcome=outcome,
        )

    async def describe_change_order(self, change_order_id: str) -> ChangeOrder:
        """One change order's status, sub-status, rollback support and pipelines."""
        _require("change_order_id", change_order_id)
        outcome, answer = await self._call(
            DESCRIBE_CHANGE_ORDER, "GET", _PATH_DESCRIBE_CO, {"ChangeOrderId": change_order_id}
        )
        return parse_change_order(data_object(answer), outcome)

    async def list_change_orders(
        self,
        app_id: str,
        co_status: int | None = None,
        page: int = 1,
        page_size: int = 20,
        co_type: str | None = None,
    ) -> ChangeOrderPage:
        """One page of an app's change orders, optionally filtered by status and type code."""
        _require("app_id", app_id)
        if page < 1 or page_size < 1:
            raise ValueError("page and page_size must be at least 1")
        query: dict[str, str | None] = {
            "AppId": app_id,
            "CoStatus": None if co_status is None else str(co_status),
            "CoType": co_type,
            "CurrentPage": str(page),
            "PageSize": str(page_size),
        }
        outcome, answer = await self._call(LIST_CHANGE_ORDERS, "GET", _PATH_LIST_CO, query)
        return parse_change_order_page(data_object(answer), outcome)

    async def describe_application_status(self, app_id: str) -> AppStatus:
        """The app's current status and its most recent change order."""
        _require("app_id", app_id)
        outcome, answer = await self._call(
            DESCRIBE_APPLICATION_STATUS, "GET", _PATH_APP_STATUS, {"AppId": app_id}
        )
        return parse_app_status(data_object(answer), outcome)

    # --- one call --------------------------------------------------------------------------

    async def _call(
        self,
        action: str,
        method: str,
        path: str,
        query: Mapping[str, str | None],
        body: bytes = b"",
        content_type: str | None = None,
    ) -> tuple[CallOutcome, Mapping[str, Any]]:
        transport = self._transport
        if not self._open or transport is None:
            raise RuntimeError("SaeClient is not open; use 'async with' or await open()")
        started_at = self._wall_clock()
        start = self._monotonic()

        try:
            credentials = await self._credentials.get()
        except Exception as exc:
            outcome = CallOutcome(
                action=action,
                http_status=None,
                code=_CREDENTIALS_CODE,
                error_code=None,
                message=str(exc) or type(exc).__name__,
                request_id=None,
                trace_id=None,
                duration_s=self._monotonic() - start,
                started_at=started_at,
                classification=Classification.TRANSPORT,
            )
            self._notify(outcome)
            raise SaeTransportError(outcome, TransportKind.CREDENTIALS) from exc

        headers = self._headers(action, credentials, started_at, body, content_type)
        headers["Authorization"] = signer.sign_request(
            method,
            path,
            query,
            headers,
            body,
            credentials.access_key_id,
            credentials.access_key_secret,
        )
        # The wire query is the canonical query itself, so the server decodes exactly the
        # values that were signed (yarl is told not to re-encode it).
        wire_query = signer.canonical_query(query)
        url = f"{self._protocol}://{self._endpoint}{path}"
        if wire_query:
            url = f"{url}?{wire_query}"
        request = HttpRequest(method=method, url=url, headers=headers, body=body)

        try:
            response = await transport(request)
        except TransportFailure as exc:
            outcome = CallOutcome(
                action=action,
                http_status=None,
                code=CODE_TRANSPORT,
                error_code=None,
                message=_scrub(exc.detail, credentials),
                request_id=None,
                trace_id=None,
                duration_s=self._monotonic() - start,
                started_at=started_at,
                classification=Classification.TRANSPORT,
            )
            self._notify(outcome)
            raise SaeTransportError(outcome, exc.kind) from exc

        outcome, answer, error = interpret_response(
            action,
            response,
            started_at=started_at,
            duration_s=self._monotonic() - start,
            credentials=credentials,
        )
        self._notify(outcome)
        if error is not None:
            raise error
        return outcome, answer

    def _headers(
        self,
        action: str,
        credentials: Credentials,
        now: datetime,
        body: bytes,
        content_type: str | None,
    ) -> dict[str, str]:
        # Same names and order as the SDK's do_request; every one of them is signed.
        headers = {
            "host": self._endpoint,
            "x-acs-version": API_VERSION,
            "x-acs-action": action,
            "user-agent": USER_AGENT,
            "x-acs-date": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            # A fresh nonce per attempt: SAE rejects a reused one (SignatureNonceUsed).
            "x-acs-signature-nonce": secrets.token_hex(16),
            "accept": "application/json",
        }
        if content_type is not None:
            headers["content-type"] = content_type
        headers["x-acs-content-sha256"] = signer.payload_sha256(body)
        headers["x-acs-credentials-provider"] = credentials.provider_name
        if credentials.security_token:
            headers["x-acs-accesskey-id"] = credentials.access_key_id
            headers["x-acs-security-token"] = credentials.security_token
        return headers

    def _notify(self, outcome: CallOutcome) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(outcome)
        except Exception:
            # A broken metrics/logging hook must not turn an accepted rollback into a failure
            # the worker would retry; it is reported and the call's real result stands.
            _log.exception("sae_on_call_hook_failed", action=outcome.action)


def interpret_response(
    action: str,
    response: HttpResponse,
    *,
    started_at: datetime,
    duration_s: float,
    credentials: Credentials | None = None,
) -> tuple[CallOutcome, Mapping[str, Any], SaeCallError | None]:
    """Turn an HTTP answer into its outcome, its JSON object and the error to raise (if any).

    Success means a 2xx whose body is a JSON object with ``Success`` true. A body that is not
    a JSON object (an HTML 502 from a proxy, an empty body) is a transport failure, except on
    HTTP 429 which is throttling whatever the body says. ``credentials``, when given, are
    scrubbed from SAE's message text.
    """
    status = response.status
    retry_after_s = parse_retry_after(response.headers.get("x-acs-retry-after"))
    answer: Any
    try:
        answer = json.loads(response.body)
    except (ValueError, RecursionError):
        answer = None

    if not isinstance(answer, dict):
        content_type = response.headers.get("content-type", "none")
        detail = (
            f"answer is not a JSON object (HTTP {status}, content-type {content_type}, "
            f"{len(response.body)} bytes)"
        )
        classification = Classification.THROTTLED if status == 429 else Classification.TRANSPORT
        outcome = CallOutcome(
            action=action,
            http_status=status,
            code="Throttling" if status == 429 else CODE_TRANSPORT,
            error_code=None,
            message=detail,
            request_id=response.headers.get("x-acs-request-id"),
            trace_id=response.headers.get("x-acs-trace-id"),
            duration_s=duration_s,
            started_at=started_at,
            classification=classification,
            retry_after_s=retry_after_s,
        )
        kind = TransportKind.BAD_BODY if classification is Classification.TRANSPORT else None
        return outcome, {}, error_for(outcome, kind)

    request_id = _text(answer, "RequestId") or response.headers.get("x-acs-request-id")
    trace_id = _text(answer, "TraceId") or response.headers.get("x-acs-trace-id")
    message = _text(answer, "Message")
    if message is not None and credentials is not None:
        message = _scrub(message, credentials)
    error_code = _text(answer, "ErrorCode")

    if 200 <= status < 300 and _is_true(get_field(answer, "Success")):
        outcome = CallOutcome(
            action=action,
            http_status=status,
            code=CODE_SUCCESS,
            error_code=error_code,
            message=message,
            request_id=request_id,
            trace_id=trace_id,
            duration_s=duration_s,
            started_at=started_at,
            classification=None,
            retry_after_s=retry_after_s,
        )
        return outcome, answer, None

    code = _error_code(answer, status)
    outcome = CallOutcome(
        action=action,
        http_status=status,
        code=code,
        error_code=error_code,
        message=message,
        request_id=request_id,
        trace_id=trace_id,
        duration_s=duration_s,
        started_at=started_at,
        classification=classify(status, code, retry_after_s),
        retry_after_s=retry_after_s,
    )
    return outcome, answer, error_for(outcome)


def _error_code(answer: Mapping[str, Any], status: int) -> str:
    """The error's symbolic code: ``ErrorCode``, else a non-numeric ``Code``, else a fallback.

    SAE business errors carry the string in ``ErrorCode`` (and often ``Code``); gateway errors
    only in ``Code``; older bodies put a number (``400``, ``"400"``) in ``Code``. Without any
    symbolic code: the numeric ``Code`` or the HTTP status as text, or ``"Success.NotTrue"`` for
    a 2xx whose ``Success`` is not true.
    """
    numeric: str | None = None
    for name in ("ErrorCode", "Code"):
        value = _text(answer, name)
        if value is None or not value.strip():
            continue
        value = value.strip()
        if value.lstrip("-").isdigit():
            numeric = numeric or value
            continue
        if value.lower() == "success":
            # Docs show ErrorCode "success" even on success; it names no error.
            continue
        return value
    if 200 <= status < 300:
        return "Success.NotTrue"
    return numeric if numeric is not None and numeric != "200" else str(status)


def _text(answer: Mapping[str, Any], name: str) -> str | None:
    value = get_field(answer, name)
    if value is None or isinstance(value, dict | list | bool):
        return None
    return str(value)


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _scrub(text: str, credentials: Credentials) -> str:
    # Defence in depth: no SAE message is known to echo secrets, but a verbose gateway or proxy
    # could, and these messages end up in the store, logs and the HTTP API.
    for secret in (credentials.access_key_secret, credentials.security_token or ""):
        if secret:
            text = text.replace(secret, "***")
    return text


def _require(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")


def _utc_now() -> datetime:
    return datetime.now(UTC)

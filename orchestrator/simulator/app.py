"""The simulator's HTTP face: SAE's change-order API, the ``/_sim`` control API, and the server.

Served API (ROA, parameters in the query, sae-api.md §1-§2)::

    PUT /pop/v1/sam/changeorder/AbortAndRollbackChangeOrder?ChangeOrderId=..
    GET /pop/v1/sam/changeorder/DescribeChangeOrder?ChangeOrderId=..
    GET /pop/v1/sam/changeorder/ListChangeOrders?AppId=..[&CoStatus&CoType&Key&CurrentPage
                                                 &PageSize&Reverse]
    GET /pop/v1/sam/app/describeApplicationStatus?AppId=..
    PUT /pop/v5/changeorder/ChangeOrderAbortAndRollback   {"ChangeOrderId": ..} (legacy; or query)

Every API call is verified (``auth.Verifier``), counted against ``calls_per_minute`` when set
(``Throttling.User``), matched against posted faults, then run against ``SimState``. Any other
path or method answers ``InvalidApi.NotFound`` (404). The hot path is one catch-all handler with
dict lookups and no logging; nothing in it blocks.

Control API (unsigned, contract.md "Simulator control"; errors are
``{"error": {"code", "message"}}`` with 400/404/409)::

    POST   /_sim/change-orders        {"app_id", "change_order_id"?, "status"?: 1, "rollback_s"?: 1,
                                       "support_rollback"?: true, "co_type"?: "CoDeploy",
                                       "description"?: ""}  -> the order (has "change_order_id")
    GET    /_sim/change-orders/{id}   -> {"change_order_id", "app_id", "status", "status_name",
                                          "running", "support_rollback", "co_type", "rollback_s",
                                          "created_at", "aborted_at", "finished_at"}
    POST   /_sim/apps/{app_id}/busy   {"seconds": N}             -> {"app_id", "busy_until"}
    GET    /_sim/apps/{app_id}        -> {"app_id", "busy_until", "change_order_ids",
                                          "last_change_order_id"}
    POST   /_sim/faults               see faults.py              -> {"fault": {...}}
    GET    /_sim/faults               -> {"faults": [...]}
    DELETE /_sim/faults               -> {"cleared": n}
    GET    /_sim/calls[?action=&change_order_id=&app_id=]
                                      -> {"calls": [{"action", "path", "change_order_id", "app_id",
                                          "access_key_id", "http_status", "code", "request_id",
                                          "trace_id", "at", "accepted", "fault"}], "total": n}
    DELETE /_sim/calls                forget recorded calls
    POST   /_sim/reset                forget apps, orders, calls and faults
    GET    /_sim/healthz              -> {"status": "ok"}

In ``/_sim/calls``, ``code`` is the ``Code`` the simulator answered (``"200"`` on success),
``http_status``/``code`` are ``null`` when no answer was sent (hang, reset), ``at`` is the
simulator clock in epoch seconds, and ``accepted`` is true for an abort that took effect (also
when a fault with ``apply: true`` lost its answer). Calls rejected by the gateway (bad
signature, throttled) are recorded too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web

from orchestrator.logging import get_logger
from orchestrator.simulator.auth import Verifier
from orchestrator.simulator.faults import Fault, FaultBook, parse_fault
from orchestrator.simulator.state import (
    LAST_STATUS_NAMES,
    TERMINAL_STATUSES,
    ApiError,
    App,
    CallRecord,
    ChangeOrder,
    ControlError,
    SimState,
    api_error,
    is_gateway_code,
)

__all__ = [
    "ACTIONS",
    "DEFAULT_ACCESS_KEY_ID",
    "DEFAULT_ACCESS_KEY_SECRET",
    "DEMO_APP_ID",
    "SimulatorServer",
    "build_app",
    "serve_forever",
]

DEFAULT_ACCESS_KEY_ID: Final = "LTAI5tTESTONLYAKID00000"
DEFAULT_ACCESS_KEY_SECRET: Final = "TestOnlySecretDoNotUse0000000000"  # noqa: S105 - test-only
DEMO_APP_ID: Final = "demo-app"
DEMO_ROLLBACK_S: Final = 3.0
HANG_MAX_S: Final = 300.0
# How often a hanging call checks whether its client left or the server is stopping.
_POLL_S: Final = 0.05

ABORT: Final = "AbortAndRollbackChangeOrder"
DESCRIBE: Final = "DescribeChangeOrder"
LIST: Final = "ListChangeOrders"
APP_STATUS: Final = "DescribeApplicationStatus"
ACTIONS: Final = frozenset({ABORT, DESCRIBE, LIST, APP_STATUS})


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    action: str
    legacy: bool = False


_ROUTES: Final[dict[str, _Route]] = {
    "/pop/v1/sam/changeorder/AbortAndRollbackChangeOrder": _Route("PUT", ABORT),
    "/pop/v1/sam/changeorder/DescribeChangeOrder": _Route("GET", DESCRIBE),
    "/pop/v1/sam/changeorder/ListChangeOrders": _Route("GET", LIST),
    "/pop/v1/sam/app/describeApplicationStatus": _Route("GET", APP_STATUS),
    "/pop/v5/changeorder/ChangeOrderAbortAndRollback": _Route("PUT", ABORT, legacy=True),
}

_JSON_TYPE: Final = "application/json;charset=utf-8"
_DEFAULT_HOST_ID: Final = "sae.cn-hangzhou.aliyuncs.com"
_GARBAGE_PAGE: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_CO_TYPE_NAMES: Final = {
    "CoDeploy": "Deploy Application",
    "CoRollback": "Rollback Application",
    "CoDeployHistroy": "Rollback To History Version",
    "CoRestartApplication": "Restart Application",
    "CoScaleIn": "Scale In",
    "CoScaleOut": "Scale Out",
    "CoStart": "Start Application",
    "CoStop": "Stop Application",
    "CoCreateApp": "Create Application",
    "CoDeleteApp": "Delete Application",
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@functools.lru_cache(maxsize=4096)
def _sae_time(epoch_s: float | None) -> str:
    """SAE's ``CreateTime`` style, ``2020-12-17 21:06:45`` (UTC here).

    Cached: the same order's times are formatted on every Describe/List poll.
    """
    if epoch_s is None:
        return ""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _int_param(params: Mapping[str, str], name: str, default: int, low: int = 1) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise api_error("InvalidParameter.WithMessage", name, "not an integer") from None
    if value < low:
        raise api_error("InvalidParameter.WithMessage", name, f"must be >= {low}")
    return value


def _order_json(order: ChangeOrder, now: float) -> dict[str, Any]:
    """DescribeChangeOrder's ``Data`` (sae-api.md §2.1)."""
    status = order.status_at(now)
    started_ms = int(order.created_at * 1000)
    finished = order.finished_at(now)
    updated_ms = int((finished if finished is not None else now) * 1000)
    return {
        "ChangeOrderId": order.change_order_id,
        "AppId": order.app_id,
        "AppName": order.app_id,
        "Status": status,
        "SubStatus": 0,
        "SupportRollback": order.support_rollback,
        "CoType": _CO_TYPE_NAMES.get(order.co_type, order.co_type),
        "CoTypeCode": order.co_type,
        "CreateTime": _sae_time(order.created_at),
        "Description": order.description,
        "ErrorMessage": "",
        "BatchCount": 1,
        "BatchType": "auto",
        "BatchWaitTime": 0,
        "Auto": True,
        "CurrentPipelineId": order.pipeline_id,
        "Pipelines": [
            {
                "PipelineId": order.pipeline_id,
                "PipelineName": "Batch 1 Change",
                "Status": status,
                "StartTime": started_ms,
                "UpdateTime": updated_ms,
                "BatchType": 0,
                "ParallelCount": 0,
            }
        ],
        "ApprovalId": "",
        "ApplicationEnableGreyTagRoute": False,
    }


def _list_item_json(order: ChangeOrder, now: float) -> dict[str, Any]:
    """One ``ListChangeOrders`` ``ChangeOrderList[]`` item (sae-api.md §2.2)."""
    return {
        "ChangeOrderId": order.change_order_id,
        "AppId": order.app_id,
        "GroupId": "",
        "Status": order.status_at(now),
        "CoType": _CO_TYPE_NAMES.get(order.co_type, order.co_type),
        "CoTypeCode": order.co_type,
        "CreateTime": _sae_time(order.created_at),
        "FinishTime": _sae_time(order.finished_at(now)),
        "CreateUserId": "sae-simulator",
        "UserId": "sae-simulator",
        "Description": order.description,
        "Source": "console",
        "BatchCount": 1,
        "BatchType": "auto",
    }


def _app_status_json(app: App, now: float) -> dict[str, Any]:
    """DescribeApplicationStatus's ``Data`` (sae-api.md §2.3)."""
    last = app.last_order(now)
    status = last.status_at(now) if last is not None else None
    return {
        "AppId": app.app_id,
        "CurrentStatus": "RUNNING",
        "RunningInstances": 2,
        "LastChangeOrderId": last.change_order_id if last is not None else "",
        "LastChangeOrderRunning": status is not None and status not in TERMINAL_STATUSES,
        "LastChangeOrderStatus": LAST_STATUS_NAMES.get(status, "") if status is not None else "",
        "SubStatus": "NORMAL",
        "CreateTime": str(int(app.created_at * 1000)),
        "EnableAgent": False,
        "ArmsAdvancedEnabled": "false",
    }


class _Simulator:
    """Request handlers over one ``SimState``; stored in the aiohttp app under ``SIMULATOR``."""

    def __init__(
        self,
        state: SimState,
        verifier: Verifier,
        faults: FaultBook,
        hang_max_s: float,
    ) -> None:
        self.state = state
        self.verifier = verifier
        self.faults = faults
        self.hang_max_s = hang_max_s
        # Set by SimulatorServer.stop(): hanging and delayed calls end promptly.
        self.stopping = False

    # answers ----------------------------------------------------------------------------

    @staticmethod
    def _response(status: int, payload: dict[str, Any], request_id: str) -> web.Response:
        return web.Response(
            status=status,
            body=_dumps(payload),
            headers={"Content-Type": _JSON_TYPE, "x-acs-request-id": request_id},
        )

    def _error(
        self,
        request: web.Request,
        err: ApiError,
        request_id: str,
        trace_id: str | None,
        *,
        retry_after_ms: int | None = None,
    ) -> web.Response:
        payload: dict[str, Any] = {
            "RequestId": request_id,
            "HostId": request.headers.get("Host", _DEFAULT_HOST_ID),
            "Code": err.code,
            "Message": err.message,
            "Recommend": f"https://next.api.aliyun.com/troubleshoot?q={err.code}&product=sae",
        }
        if not err.gateway:
            # SAE business errors also carry the envelope fields (sae-api.md §3.1).
            payload.update(ErrorCode=err.code, TraceId=trace_id, Success=False, Data=None)
        response = self._response(err.http_status, payload, request_id)
        if retry_after_ms is not None:
            response.headers["x-acs-retry-after"] = str(retry_after_ms)
        return response

    @staticmethod
    def _reset(request: web.Request) -> web.Response:
        """Drop the connection with a TCP RST; the returned response is never written."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0 turns close() into an RST, like a crashed proxy, not a polite FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=500)

    async def _pause(self, seconds: float, request: web.Request | None = None) -> None:
        """Sleep ``seconds``, ending early when the server stops (or ``request``'s client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.stopping:
            if request is not None:
                transport = request.transport
                if transport is None or transport.is_closing():
                    return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _POLL_S))

    # API --------------------------------------------------------------------------------

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        """Every non-control request: route, verify, throttle, fault, run."""
        state = self.state
        route = _ROUTES.get(request.path)
        body = await request.read()
        now = state.clock()
        request_id = state.new_request_id()
        raw_path = request.raw_path
        path, _, raw_query = raw_path.partition("?")
        # Form decoding: the SDK's sync client sends '+' for a space (sae-api.md §4.5).
        # surrogateescape keeps undecodable bytes so the signature check, not a crash, fails.
        params = dict(parse_qsl(raw_query, keep_blank_values=True, errors="surrogateescape"))
        record = CallRecord(
            action=route.action if route is not None else request.headers.get("x-acs-action", ""),
            path=request.path,
            change_order_id=params.get("ChangeOrderId"),
            app_id=params.get("AppId"),
            access_key_id=None,
            http_status=None,
            code=None,
            request_id=request_id,
            trace_id=None,
            at=now,
        )
        state.record(record)
        if route is None or route.method != request.method:
            return self._finish(record, request, api_error("InvalidApi.NotFound"))
        try:
            # Signatures are checked against the real wall clock (clients sign with it); the
            # injected clock drives only the simulated world.
            record.access_key_id = self.verifier.verify(
                request.method, path, params, request.headers, body, time.time()
            )
            if state.budget is not None and not state.budget.try_acquire(now):
                raise api_error("Throttling.User")
        except ApiError as err:
            return self._finish(record, request, err)
        if route.legacy:
            try:
                self._legacy_params(params, body)
            except ApiError as err:
                return self._finish(record, request, err, trace_id=state.new_trace_id())
            record.change_order_id = params.get("ChangeOrderId")
        fault = self.faults.take(route.action, record.change_order_id)
        if fault is None:
            return self._run(request, route, params, record)
        return await self._faulted(request, route, params, record, fault)

    @staticmethod
    def _legacy_params(params: dict[str, str], body: bytes) -> None:
        """The seed's v5 path takes ``ChangeOrderId`` from a JSON body (or the query)."""
        if not body.strip():
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise api_error("InvalidParameter.WithMessage", "body", "not a JSON object")
        value = data.get("ChangeOrderId")
        if value is not None:
            params["ChangeOrderId"] = str(value)

    def _finish(
        self,
        record: CallRecord,
        request: web.Request,
        err: ApiError,
        *,
        trace_id: str | None = None,
        retry_after_ms: int | None = None,
    ) -> web.Response:
        record.http_status = err.http_status
        record.code = err.code
        record.trace_id = trace_id
        return self._error(request, err, record.request_id, trace_id, retry_after_ms=retry_after_ms)

    def _execute(self, route: _Route, params: Mapping[str, str]) -> dict[str, Any]:
        """Run one action on the state; its ``Data``, or raise the SAE error."""
        state = self.state
        if route.action == ABORT:
            order = state.abort_and_rollback(params.get("ChangeOrderId"))
            return {"ChangeOrderId": order.change_order_id}
        if route.action == DESCRIBE:
            return _order_json(state.order(params.get("ChangeOrderId")), state.clock())
        if route.action == APP_STATUS:
            return _app_status_json(state.app(params.get("AppId")), state.clock())
        # ListChangeOrders
        page = _int_param(params, "CurrentPage", 1)
        page_size = _int_param(params, "PageSize", 10)
        raw_status = params.get("CoStatus")
        co_status = _int_param(params, "CoStatus", 0, low=0) if raw_status else None
        orders, total = state.list_change_orders(
            params.get("AppId"),
            co_status=co_status,
            co_type=params.get("CoType") or None,
            key=params.get("Key") or None,
            page=page,
            page_size=page_size,
            # The Python SDK sends booleans as `True`/`False` (sae-api.md §2).
            reverse=params.get("Reverse", "").lower() == "true",
        )
        now = state.clock()
        return {
            "ChangeOrderList": [_list_item_json(order, now) for order in orders],
            "CurrentPage": page,
            "PageSize": page_size,
            "TotalSize": total,
        }

    def _apply(
        self, route: _Route, params: Mapping[str, str], record: CallRecord
    ) -> dict[str, Any] | ApiError:
        """Run the action and note its effect on ``record``; the data or the error."""
        try:
            data = self._execute(route, params)
        except ApiError as err:
            return err
        record.accepted = route.action == ABORT
        return data

    def _run(
        self,
        request: web.Request,
        route: _Route,
        params: Mapping[str, str],
        record: CallRecord,
    ) -> web.Response:
        result = self._apply(route, params, record)
        trace_id = self.state.new_trace_id()
        if isinstance(result, ApiError):
            return self._finish(record, request, result, trace_id=trace_id)
        record.http_status, record.code, record.trace_id = 200, "200", trace_id
        payload = {
            "RequestId": record.request_id,
            "Code": "200",
            "Message": "success",
            "Success": True,
            "TraceId": trace_id,
            "Data": result,
        }
        return self._response(200, payload, record.request_id)

    async def _faulted(
        self,
        request: web.Request,
        route: _Route,
        params: Mapping[str, str],
        record: CallRecord,
        fault: Fault,
    ) -> web.StreamResponse:
        record.fault = fault.mode or "latency"
        if fault.apply and fault.mode is not None:
            # "The call takes effect first and only its answer is lost": before any latency,
            # so another client's call during the pause already sees its effect.
            self._apply(route, params, record)
        if fault.latency_s > 0:
            # Like a real server, the call proceeds even if the client gave up meanwhile: a
            # read timeout on the client side is an ambiguous outcome.
            await self._pause(fault.latency_s)
        if fault.mode is None:
            return self._run(request, route, params, record)
        if fault.mode == "error":
            assert fault.code is not None  # parse_fault always sets a code for errors
            err = api_error(fault.code, http_status=fault.http_status)
            if fault.message is not None:
                err.message = fault.message
            trace_id = None if is_gateway_code(fault.code) else self.state.new_trace_id()
            return self._finish(
                record, request, err, trace_id=trace_id, retry_after_ms=fault.retry_after_ms
            )
        if fault.mode == "garbage":
            record.http_status = fault.http_status
            return web.Response(
                status=fault.http_status,
                body=_GARBAGE_PAGE,
                headers={"Content-Type": "text/html", "Server": "nginx"},
            )
        if fault.mode == "hang":
            await self._pause(self.hang_max_s, request)
        return self._reset(request)

    # control ----------------------------------------------------------------------------

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise ControlError("InvalidParameter", "the body must be JSON") from None
        if not isinstance(data, dict):
            raise ControlError("InvalidParameter", "the body must be a JSON object")
        return data

    async def create_change_order(self, request: web.Request) -> web.Response:
        """``POST /_sim/change-orders``."""
        body = await self._json_body(request)
        allowed = {
            "app_id",
            "change_order_id",
            "status",
            "rollback_s",
            "support_rollback",
            "co_type",
            "description",
        }
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ControlError("InvalidParameter", f"unknown field(s): {', '.join(unknown)}")
        app_id = body.get("app_id")
        change_order_id = body.get("change_order_id")
        status = body.get("status", 1)
        rollback_s = body.get("rollback_s", 1.0)
        support_rollback = body.get("support_rollback", True)
        co_type = body.get("co_type", "CoDeploy")
        description = body.get("description", "")
        if not isinstance(app_id, str) or not app_id:
            raise ControlError("InvalidParameter", "app_id must be a non-empty string")
        if change_order_id is not None and not isinstance(change_order_id, str):
            raise ControlError("InvalidParameter", "change_order_id must be a string")
        if isinstance(status, bool) or not isinstance(status, int):
            raise ControlError("InvalidParameter", "status must be an integer status code")
        if isinstance(rollback_s, bool) or not isinstance(rollback_s, int | float):
            raise ControlError("InvalidParameter", "rollback_s must be a number")
        if not isinstance(support_rollback, bool):
            raise ControlError("InvalidParameter", "support_rollback must be a boolean")
        if not isinstance(co_type, str) or not co_type:
            raise ControlError("InvalidParameter", "co_type must be a non-empty string")
        if not isinstance(description, str):
            raise ControlError("InvalidParameter", "description must be a string")
        order = self.state.create_change_order(
            app_id,
            change_order_id=change_order_id,
            status=status,
            rollback_s=float(rollback_s),
            support_rollback=support_rollback,
            co_type=co_type,
            description=description,
        )
        return web.json_response(order.snapshot(self.state.clock()))

    async def get_change_order(self, request: web.Request) -> web.Response:
        """``GET /_sim/change-orders/{id}``."""
        order = self.state.orders.get(request.match_info["change_order_id"])
        if order is None:
            raise ControlError("NotFound", "no such change order", http_status=404)
        return web.json_response(order.snapshot(self.state.clock()))

    async def set_busy(self, request: web.Request) -> web.Response:
        """``POST /_sim/apps/{app_id}/busy``."""
        body = await self._json_body(request)
        seconds = body.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ControlError("InvalidParameter", "seconds must be a number")
        app = self.state.set_busy(request.match_info["app_id"], float(seconds))
        return web.json_response({"app_id": app.app_id, "busy_until": app.busy_until})

    async def get_app(self, request: web.Request) -> web.Response:
        """``GET /_sim/apps/{app_id}``."""
        app = self.state.apps.get(request.match_info["app_id"])
        if app is None:
            raise ControlError("NotFound", "no such app", http_status=404)
        last = app.last_order(self.state.clock())
        return web.json_response(
            {
                "app_id": app.app_id,
                "busy_until": app.busy_until,
                "change_order_ids": [order.change_order_id for order in app.orders],
                "last_change_order_id": last.change_order_id if last is not None else None,
            }
        )

    async def add_fault(self, request: web.Request) -> web.Response:
        """``POST /_sim/faults``."""
        fault = parse_fault(await self._json_body(request), ACTIONS)
        self.faults.add(fault)
        return web.json_response({"fault": fault.as_json()})

    async def list_faults(self, request: web.Request) -> web.Response:
        """``GET /_sim/faults``."""
        return web.json_response({"faults": self.faults.as_json()})

    async def clear_faults(self, request: web.Request) -> web.Response:
        """``DELETE /_sim/faults``."""
        count = len(self.faults)
        self.faults.clear()
        return web.json_response({"cleared": count})

    async def list_calls(self, request: web.Request) -> web.Response:
        """``GET /_sim/calls``, optionally filtered by ``action``/``change_order_id``/``app_id``."""
        filters = {
            name: request.query[name]
            for name in ("action", "change_order_id", "app_id")
            if name in request.query
        }
        calls = [call.as_json() for call in self.state.calls]
        if filters:
            calls = [c for c in calls if all(c[k] == v for k, v in filters.items())]
        return web.json_response({"calls": calls, "total": self.state.calls_total})

    async def clear_calls(self, request: web.Request) -> web.Response:
        """``DELETE /_sim/calls``."""
        self.state.calls.clear()
        self.state.calls_total = 0
        return web.json_response({"cleared": True})

    async def reset(self, request: web.Request) -> web.Response:
        """``POST /_sim/reset``: a blank simulator (credentials and nonces are kept)."""
        self.state.reset()
        self.faults.clear()
        return web.json_response({"reset": True})

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /_sim/healthz``."""
        return web.json_response({"status": "ok"})


SIMULATOR: Final = web.AppKey("simulator", _Simulator)


@web.middleware
async def _control_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Answer control errors, unknown control paths and wrong methods with the JSON error body."""
    try:
        response: web.StreamResponse = await handler(request)
    except ControlError as err:
        return web.json_response(
            {"error": {"code": err.code, "message": err.message}}, status=err.http_status
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.title().replace(" ", "")  # "Not Found" -> "NotFound"
        return web.json_response(
            {"error": {"code": code, "message": f"{request.method} {request.path}: {exc.reason}"}},
            status=exc.status,
        )
    return response


def build_app(
    state: SimState,
    *,
    credentials: Mapping[str, str] | None = None,
    security_tokens: Mapping[str, str] | None = None,
    faults: FaultBook | None = None,
    hang_max_s: float = HANG_MAX_S,
) -> web.Application:
    """The aiohttp application serving ``state``: SAE API plus ``/_sim`` control."""
    verifier = Verifier(
        credentials
        if credentials is not None
        else {DEFAULT_ACCESS_KEY_ID: DEFAULT_ACCESS_KEY_SECRET},
        security_tokens=security_tokens,
    )
    sim = _Simulator(state, verifier, faults if faults is not None else FaultBook(), hang_max_s)
    # No middleware on the main app: the API hot path stays one handler call.
    app = web.Application()
    app[SIMULATOR] = sim
    control = web.Application(middlewares=[_control_errors])
    control.router.add_post("/change-orders", sim.create_change_order)
    control.router.add_get("/change-orders/{change_order_id:.+}", sim.get_change_order)
    control.router.add_post("/apps/{app_id:[^/]+}/busy", sim.set_busy)
    control.router.add_get("/apps/{app_id:[^/]+}", sim.get_app)
    control.router.add_post("/faults", sim.add_fault)
    control.router.add_get("/faults", sim.list_faults)
    control.router.add_delete("/faults", sim.clear_faults)
    control.router.add_get("/calls", sim.list_calls)
    control.router.add_delete("/calls", sim.clear_calls)
    control.router.add_post("/reset", sim.reset)
    control.router.add_get("/healthz", sim.healthz)
    app.add_subapp("/_sim", control)
    app.router.add_route("*", "/{tail:.*}", sim.handle_api)

    async def release_waiting_calls(_: web.Application) -> None:
        # on_shutdown runs before the runner waits for in-flight handlers, so hanging and
        # delayed calls end instead of holding the shutdown for hang_max_s.
        sim.stopping = True

    app.on_shutdown.append(release_waiting_calls)
    return app


class SimulatorServer:
    """The simulator on a real socket: ``async with SimulatorServer() as sim: sim.endpoint``.

    ``__init__`` does no I/O; :meth:`start` binds (port 0 picks a free port) and :meth:`stop`
    closes the listener and every connection, ending hanging calls first. Point the official
    SDK at it with ``Config(endpoint=sim.endpoint, protocol="http", ...)``.

    ``credentials`` maps access key ids to secrets (default: the one test pair);
    ``security_tokens`` optionally pins the STS token each key id must present. ``clock``
    (epoch seconds) drives the simulated world: rollbacks, busy windows, the throttle window
    and call timestamps. Signature dates and nonces are always checked against the real wall
    clock, because that is what clients sign with. ``demo`` creates ``demo-app`` with a
    running change order. ``hang_max_s`` bounds how long a ``hang`` fault holds a call.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        credentials: Mapping[str, str] | None = None,
        seed: int | None = None,
        calls_per_minute: int | None = None,
        demo: bool = False,
        clock: Callable[[], float] | None = None,
        security_tokens: Mapping[str, str] | None = None,
        hang_max_s: float = HANG_MAX_S,
    ) -> None:
        self.host = host
        self.port = port
        self.state = SimState(clock=clock, seed=seed, calls_per_minute=calls_per_minute)
        self.faults = FaultBook()
        self._app = build_app(
            self.state,
            credentials=credentials,
            security_tokens=security_tokens,
            faults=self.faults,
            hang_max_s=hang_max_s,
        )
        self._sim = self._app[SIMULATOR]
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None
        if demo:
            seed_demo(self.state)

    def __repr__(self) -> str:
        where = self.endpoint if self._bound_port is not None else "not started"
        return f"SimulatorServer({where})"

    @property
    def endpoint(self) -> str:
        """``host:port`` for the SDK's ``Config.endpoint`` (available after :meth:`start`)."""
        if self._bound_port is None:
            raise RuntimeError("the simulator is not started")
        return f"{self.host}:{self._bound_port}"

    @property
    def base_url(self) -> str:
        """``http://host:port`` (available after :meth:`start`)."""
        return f"http://{self.endpoint}"

    async def start(self) -> None:
        """Bind and start serving."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already started")
        # No access log: the hot path must not log per request. A short shutdown timeout
        # because stop() has already released every call that would otherwise linger.
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._sim.stopping = False
        address = runner.addresses[0]
        self._bound_port = int(address[1])

    async def stop(self) -> None:
        """Stop serving; hanging and delayed calls end, their connections close unanswered."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._sim.stopping = True
        await runner.cleanup()
        self._bound_port = None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def seed_demo(state: SimState) -> ChangeOrder:
    """The demo world: ``demo-app`` with a finished deploy and a running one (returned)."""
    state.create_change_order(DEMO_APP_ID, status=2, description="previous release")
    return state.create_change_order(
        DEMO_APP_ID, rollback_s=DEMO_ROLLBACK_S, description="release under suspicion"
    )


async def serve_forever(
    host: str,
    port: int,
    *,
    credentials: Mapping[str, str],
    seed: int | None,
    calls_per_minute: int | None,
    demo: bool,
) -> None:
    """Run the simulator until cancelled; logs one ``simulator_ready`` line with the endpoint."""
    server = SimulatorServer(
        host,
        port,
        credentials=credentials,
        seed=seed,
        calls_per_minute=calls_per_minute,
        demo=demo,
    )
    await server.start()
    try:
        # Looked up here, not at import: get_logger binds the logging configuration in force.
        get_logger("orchestrator.simulator").info(
            "simulator_ready",
            endpoint=server.endpoint,
            base_url=server.base_url,
            access_key_ids=sorted(credentials),
            calls_per_minute=calls_per_minute,
            demo=demo,
        )
        await asyncio.Event().wait()
    finally:
        # Shielded so a second cancellation (a repeated Ctrl-C) cannot leave the socket open.
        await asyncio.shield(server.stop())

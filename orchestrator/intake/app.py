"""The intake and results API: routes, middlewares, and the order every request is checked in.

Endpoints (contract.md "HTTP API"): ``POST /v1/rollbacks``, ``POST|PUT /v1/webhooks/{source}``,
``GET /v1/rollbacks/{id}``, ``GET /v1/rollbacks``, ``POST /v1/rollbacks/{id}/cancel``,
``GET /metrics``, ``/healthz``, ``/readyz``, ``/openapi.json``.

Order of checks on an intake request, cheapest and least trusting first:

1. in-flight cap (503 ``overloaded``) — shed before doing any work;
2. ``Content-Length`` above ``max_body_bytes`` → 413 without reading a byte;
3. ``api`` endpoints: bearer/basic credentials (401), endpoint allowed for the source's
   kind (403), rate limit (429) — all before the body is read;
4. ``Content-Type`` must be JSON (415); the body is read with a streaming cap (413 for a
   chunked body that grows too large);
5. webhooks: credentials and the HMAC signature over the *raw* bytes (401), then the rate
   limit (503 + ``Retry-After``, which Alertmanager retries);
6. JSON (400) and schema (422);
7. authorisation: the app must be in the source's ``allowed_apps`` (403 + audit row);
8. ``store.enqueue`` commits; only then 202 (or 200 for a duplicate). ``StoreUnavailable``
   → 503 + ``Retry-After``: the sender retries and the idempotency keys make that safe.

Every answer is JSON, errors included (``{"error": {"code", "message"}}``): 404/405 from the
router and unexpected exceptions are rendered by :func:`_error_middleware`, never as a
traceback.

Repeat deliveries of an alert this process already committed are answered from
``RecentKeys`` (ratelimit.py) without a store write: counted as ``deduplicated`` and
logged at debug level, but not written to the audit trail one by one — the job's own
acceptance and its whole life are.

``sae_rollback_intake_requests_total{source,outcome}`` counts webhook deliveries *per alert*
(accepted, deduplicated, ignored, forbidden) and every other intake request once;
refusals of a whole request count once as unauthorized, forbidden, invalid or overloaded.
``source`` is a configured source name or ``unknown``, never an arbitrary path segment.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import hdrs, web

from orchestrator.config import SourceSettings
from orchestrator.errors import (
    ConfigError,
    InvalidTransition,
    JobNotFound,
    StoreError,
    StoreUnavailable,
)
from orchestrator.intake import openapi
from orchestrator.intake.alertmanager import ParsedWebhook
from orchestrator.intake.auth import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Authenticator,
    AuthFailure,
    Grant,
)
from orchestrator.intake.grafana import parse_webhook
from orchestrator.intake.ratelimit import InFlight, RateLimiter, RecentKeys
from orchestrator.intake.schemas import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    UnsupportedMedia,
    error_body,
    is_valid_job_id,
    is_valid_region,
    parse_cancel_request,
    parse_idempotency_key,
    parse_list_query,
    parse_rollback_request,
    retry_after_header,
)
from orchestrator.jobs import EnqueueResult, Job, NewJob
from orchestrator.logging import get_logger, register_secrets
from orchestrator.metrics import Metrics
from orchestrator.ops import add_ops_routes
from orchestrator.store.base import InvalidCursor, Store

log = get_logger("orchestrator.intake")

#: Requests processed at once across all sources before new ones are shed with 503.
DEFAULT_MAX_IN_FLIGHT: Final = 512
#: ``Retry-After`` when the store cannot commit: long enough for a restart or a lock to pass.
STORE_RETRY_AFTER_S: Final = 5
UNKNOWN_SOURCE: Final = "unknown"
_READ_CHUNK: Final = 64 * 1024

_HTTP_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_payload",
    429: "rate_limited",
    503: "unavailable",
}


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = _json(error_body(code, message), status=status, headers=headers)
    if status == 413:
        # The rest of an oversized body is never read: close instead of draining it.
        response.force_close()
    return response


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render every failure as the contract's JSON error body."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in (hdrs.ALLOW, hdrs.RETRY_AFTER)}
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path[:200]}"
        elif exc.status == 405:
            allowed = headers.get(hdrs.ALLOW, "")
            message = f"{request.method} is not allowed here (allowed: {allowed})"
        return _error(exc.status, code, message, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("intake_error", method=request.method, path=request.path)
        return _error(500, "internal_error", "internal error; the incident was logged")


def _outcome(exc: ApiError) -> str:
    """The intake metric's outcome for a refused request."""
    if exc.status == 401:
        return "unauthorized"
    if exc.status == 403:
        return "forbidden"
    if exc.status in (429, 503):
        return "overloaded"
    return "invalid"


def _decode_json(body: bytes) -> Any:
    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}"[:300], code="invalid_json") from None


def _is_json_media(request: web.Request) -> bool:
    if hdrs.CONTENT_TYPE not in request.headers:
        return False
    media = request.content_type.lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


@dataclass(slots=True)
class _Ctx:
    """Per-request bookkeeping for metrics and logs (set as the request is understood)."""

    source: str = UNKNOWN_SOURCE
    grant: Grant | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one webhook delivery did (the 202 body)."""

    accepted: list[str]
    deduplicated: list[str]
    cancelled: list[str]
    ignored: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "deduplicated": self.deduplicated,
            "ignored": self.ignored,
            "cancelled": self.cancelled,
        }


class _Intake:
    """The handlers and everything they share (one instance per web app)."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        sources: Mapping[str, SourceSettings],
        *,
        max_body_bytes: int,
        default_region: str,
        max_in_flight: int,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.auth = Authenticator(sources, clock=clock)
        self.limiter = RateLimiter(sources, clock=monotonic)
        self.in_flight = InFlight(max_in_flight)
        self.recent = RecentKeys(clock=monotonic)
        self.in_progress: dict[tuple[str, str], asyncio.Future[EnqueueResult]] = {}
        self.max_body_bytes = max_body_bytes
        self.default_region = default_region

    # -- plumbing -------------------------------------------------------------------------

    def count(self, source: str, outcome: str, n: int = 1) -> None:
        if n > 0:
            self.metrics.intake_requests.labels(source, outcome).inc(n)

    def intake(
        self, handler: Callable[[web.Request, _Ctx], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap an intake handler: in-flight cap, refusal metrics and logs, signature release."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            ctx = _Ctx()
            if not self.in_flight.try_enter():
                self.count(UNKNOWN_SOURCE, "overloaded")
                raise Unavailable(
                    "too many requests in progress; retry shortly",
                    code="overloaded",
                    headers=retry_after_header(1),
                )
            try:
                return await handler(request, ctx)
            except ApiError as exc:
                # Only a success consumes a signature: the sender may retry a refused request.
                self.auth.release(ctx.grant)
                self.count(ctx.source, _outcome(exc))
                log.warning(
                    "intake_rejected",
                    source=ctx.source,
                    method=request.method,
                    path=request.path,
                    status=exc.status,
                    code=exc.code,
                    reason=exc.reason if isinstance(exc, AuthFailure) else exc.message,
                    **ctx.extra,
                )
                raise
            except BaseException:
                self.auth.release(ctx.grant)
                raise
            finally:
                self.in_flight.leave()

        return wrapped

    def check_length(self, request: web.Request) -> None:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(f"the body is larger than {self.max_body_bytes} bytes")

    async def read_json_body(self, request: web.Request) -> bytes:
        """The raw body, after the media type check, read with a hard size cap."""
        if not _is_json_media(request):
            raise UnsupportedMedia("the body must be JSON (Content-Type: application/json)")
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.content.iter_chunked(_READ_CHUNK):
            total += len(chunk)
            if total > self.max_body_bytes:
                raise PayloadTooLarge(f"the body is larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def api_source(self, request: web.Request, ctx: _Ctx, what: str) -> SourceSettings:
        """The ``api`` source whose credentials the request carries (401/403 otherwise)."""
        source = self.auth.authenticate_any(request.headers.get(hdrs.AUTHORIZATION))
        ctx.source = source.name
        if source.kind != "api":
            await self.audit_rejection(source.name, "endpoint_not_allowed", {"endpoint": what})
            raise Forbidden(f"only api sources may use {what}; {source.name!r} is {source.kind}")
        return source

    def rate_limit(self, source: SourceSettings) -> None:
        wait = self.limiter.acquire(source.name)
        if wait <= 0:
            return
        message = f"source {source.name!r} is over its rate limit ({source.rate_per_s:g}/s)"
        if source.kind == "api":
            raise RateLimited(message, headers=retry_after_header(wait))
        # Alertmanager retries 5xx only: a 429 would drop the notification until the next
        # group_interval, so webhook senders are told "unavailable, retry after".
        raise Unavailable(message, code="rate_limited", headers=retry_after_header(wait))

    async def audit_rejection(self, source: str, reason: str, detail: Mapping[str, Any]) -> None:
        """Write the audit row of a refusal; losing it must not change the answer."""
        try:
            await self.store.record_rejection(source, reason, detail)
        except StoreError as exc:
            log.error("audit_failed", source=source, reason=reason, error=str(exc))

    async def enqueue_once(self, new: NewJob) -> tuple[EnqueueResult, bool]:
        """Enqueue, joining an identical enqueue already in flight instead of adding one.

        Returns the result and whether this call made the store write. In a storm the same
        alert arrives again before its first delivery committed; without this every copy
        would queue its own store transaction behind the first, and a slow store (a busy
        PostgreSQL) would fall further behind with each one.
        """
        if new.idempotency_key is None:
            return await self.enqueue(new), True
        flight = (new.source, new.idempotency_key)
        pending = self.in_progress.get(flight)
        if pending is not None:
            # shield: a caller that goes away must not cancel the write others wait for.
            return await asyncio.shield(pending), False
        task = asyncio.ensure_future(self.enqueue(new))
        self.in_progress[flight] = task

        def landed(done: asyncio.Future[EnqueueResult]) -> None:
            self.in_progress.pop(flight, None)
            if not done.cancelled():
                done.exception()  # retrieved even if every waiter went away

        task.add_done_callback(landed)
        return await asyncio.shield(task), True

    async def enqueue(self, new: NewJob) -> EnqueueResult:
        try:
            return await self.store.enqueue(new)
        except StoreUnavailable as exc:
            raise _store_down() from exc

    def _logged(self, result: EnqueueResult, source: str, **extra: Any) -> None:
        job = result.job
        fields = {
            "job_id": job.id,
            "source": source,
            "change_order_id": job.change_order_id,
            "app_id": job.app_id,
            **extra,
        }
        if result.deduplicated:
            # Debug: a storm repeats the same alert hundreds of times a second.
            log.debug("job_deduplicated", **fields)
        else:
            log.info("job_enqueued", region=job.region, dry_run=job.dry_run, **fields)

    # -- POST /v1/rollbacks ---------------------------------------------------------------

    async def submit(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        self.check_length(request)
        source = await self.api_source(request, ctx, "POST /v1/rollbacks")
        self.rate_limit(source)
        key = parse_idempotency_key(request.headers.get("Idempotency-Key"))
        body = _decode_json(await self.read_json_body(request))
        wanted = parse_rollback_request(body)
        ctx.extra = {"app_id": wanted.app_id, "change_order_id": wanted.change_order_id}
        if not source.allows_app(wanted.app_id):
            await self.audit_rejection(
                source.name,
                "app_not_allowed",
                {
                    "endpoint": "POST /v1/rollbacks",
                    "app_id": wanted.app_id,
                    "change_order_id": wanted.change_order_id,
                },
            )
            raise Forbidden(_not_allowed(source, wanted.app_id))
        new = NewJob(
            region=wanted.region or self.default_region,
            source=source.name,
            change_order_id=wanted.change_order_id,
            app_id=wanted.app_id,
            reason=wanted.reason,
            requested_by=wanted.requested_by or source.name,
            dry_run=source.dry_run,
            idempotency_key=f"req:{key}" if key is not None else None,
        )
        result = await self.enqueue(new)
        if key is not None and result.deduplicated and _conflicts(result.job, new):
            # 409, not 422: the request is valid on its own, it conflicts with an earlier one.
            raise Conflict(
                "this Idempotency-Key was already used for a different request",
                code="idempotency_key_reused",
            )
        self._logged(result, source.name, idempotency_key=key is not None)
        self.count(source.name, "deduplicated" if result.deduplicated else "accepted")
        return _json(
            {**result.job.to_dict(), "deduplicated": result.deduplicated},
            status=200 if result.deduplicated else 202,
        )

    # -- POST /v1/webhooks/{source} -------------------------------------------------------

    async def webhook(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        name = request.match_info["source"]
        if self.auth.source(name) is not None:
            ctx.source = name
        self.check_length(request)
        raw = await self.read_json_body(request)
        # The signature is checked on these exact bytes, before anything parses them.
        grant = self.auth.authenticate_source(
            name,
            request.headers.get(hdrs.AUTHORIZATION),
            request.headers.get(SIGNATURE_HEADER),
            request.headers.get(TIMESTAMP_HEADER),
            raw,
        )
        if grant.replayed is not None:
            # The identical signed request was accepted already: same answer, nothing redone.
            log.info("webhook_replayed", source=name)
            self.count(name, "deduplicated")
            return web.Response(body=grant.replayed, status=202, content_type="application/json")
        ctx.grant = grant
        source = grant.source
        if source.kind == "api":
            await self.audit_rejection(
                name, "endpoint_not_allowed", {"endpoint": f"{request.method} /v1/webhooks"}
            )
            raise Forbidden(
                f"{name!r} is an api source: submit through POST /v1/rollbacks, "
                "webhooks are for alertmanager and grafana sources"
            )
        self.rate_limit(source)
        parsed = parse_webhook(_decode_json(raw), default_region=self.default_region)
        if parsed.truncated_alerts:
            log.warning("alerts_truncated", source=name, truncated_alerts=parsed.truncated_alerts)
        outcome = await self.process_alerts(source, parsed)
        answer = json.dumps(outcome.to_dict()).encode()
        self.auth.complete(grant, answer)
        return web.Response(body=answer, status=202, content_type="application/json")

    async def process_alerts(self, source: SourceSettings, parsed: ParsedWebhook) -> _Outcome:
        """Enqueue allowed firing targets, cancel on resolve if configured, list the rest."""
        name = source.name
        allowed = [t for t in parsed.firing if source.allows_app(t.app_id)]
        forbidden = [t for t in parsed.firing if not source.allows_app(t.app_id)]
        for target in forbidden:
            await self.audit_rejection(
                name,
                "app_not_allowed",
                {
                    "endpoint": f"POST /v1/webhooks/{name}",
                    "app_id": target.app_id,
                    "change_order_id": target.change_order_id,
                    "fingerprint": target.fingerprint,
                },
            )
        if forbidden and not allowed:
            # Nothing in this delivery may run: refuse it loudly (the sender logs a failure)
            # instead of a 202 that would look like a rollback was on its way. Per-alert
            # counting as for a 202; the wrapper counts the refused request as the last one.
            self.count(name, "forbidden", len(forbidden) - 1)
            raise Forbidden("; ".join(sorted({_not_allowed(source, t.app_id) for t in forbidden})))
        ignored: list[tuple[int, dict[str, Any]]] = [(i.index, i.to_dict()) for i in parsed.ignored]
        for target in forbidden:
            ignored.append(
                (
                    target.index,
                    {
                        "fingerprint": target.fingerprint,
                        "reason": _not_allowed(source, target.app_id),
                    },
                )
            )
        accepted: list[str] = []
        deduplicated: list[str] = []
        for target in allowed:
            key = target.idempotency_key
            known = self.recent.get(name, key)
            if known is not None:
                # A re-send of an alert this process already committed: same job, no write.
                log.debug("job_deduplicated", job_id=known, source=name, cached=True)
                deduplicated.append(known)
                continue
            new = NewJob(
                region=target.region,
                source=name,
                change_order_id=target.change_order_id,
                app_id=target.app_id,
                reason=target.reason,
                requested_by=target.requested_by,
                dry_run=source.dry_run,
                idempotency_key=key,
            )
            result, first = await self.enqueue_once(new)
            if first:
                self.recent.put(name, key, result.job.id)
                self._logged(result, name, fingerprint=target.fingerprint, format=parsed.format)
            if result.deduplicated or not first:
                deduplicated.append(result.job.id)
            else:
                accepted.append(result.job.id)
        cancelled: list[str] = []
        for alert in parsed.resolved:
            reason = "resolved: a resolved alert never starts a rollback"
            if source.cancel_on_resolved and alert.has_target:
                job = await self.cancel_resolved(name, alert.idempotency_key)
                if isinstance(job, Job):
                    cancelled.append(job.id)
                    reason = f"resolved: cancelled job {job.id} before it ran"
                else:
                    reason = f"resolved: {job}"
            ignored.append((alert.index, {"fingerprint": alert.fingerprint, "reason": reason}))
        ignored.sort(key=lambda pair: pair[0])
        for _, item in ignored:
            log.info(
                "alert_ignored", source=name, fingerprint=item["fingerprint"], reason=item["reason"]
            )
        self.count(name, "accepted", len(accepted))
        self.count(name, "deduplicated", len(deduplicated))
        self.count(name, "ignored", len(ignored) - len(forbidden))
        self.count(name, "forbidden", len(forbidden))
        return _Outcome(accepted, deduplicated, cancelled, [item for _, item in ignored])

    async def cancel_resolved(self, source: str, key: str) -> Job | str:
        """Cancel the job of a resolved alert's episode, or say why nothing was cancelled."""
        try:
            job = await self.store.cancel_by_idempotency_key(
                source, key, reason="alert resolved", by=source
            )
        except StoreUnavailable as exc:
            raise _store_down() from exc
        except InvalidTransition:
            return "its job already started or finished, so it was not cancelled"
        except JobNotFound:
            return "no job was created for this alert"
        if job is None:
            return "no job was created for this alert"
        log.info("job_cancelled", job_id=job.id, source=source, reason="alert resolved")
        return job

    # -- results --------------------------------------------------------------------------

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        self.auth_any(request)
        job_id = request.match_info["id"]
        return _json((await self.load(job_id)).to_dict())

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        self.auth_any(request)
        query = parse_list_query(request.query)
        try:
            page = await self.store.list_jobs(
                status=query.status,
                app_id=query.app_id,
                source=query.source,
                limit=query.limit,
                cursor=query.cursor,
            )
        except InvalidCursor as exc:
            raise BadRequest(str(exc), code="invalid_cursor") from None
        except StoreUnavailable as exc:
            raise _store_down() from exc
        return _json(
            {"items": [job.to_dict() for job in page.items], "next_cursor": page.next_cursor}
        )

    async def cancel(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        self.check_length(request)
        source = await self.api_source(request, ctx, "POST /v1/rollbacks/{id}/cancel")
        self.rate_limit(source)
        body = _decode_json(await self.read_json_body(request)) if request.body_exists else None
        reason = parse_cancel_request(body) or f"cancelled through the API by {source.name}"
        job_id = request.match_info["id"]
        job = await self.load(job_id)
        ctx.extra = {"job_id": job_id, "app_id": job.app_id}
        if not source.allows_app(job.app_id):
            await self.audit_rejection(
                source.name,
                "app_not_allowed",
                {
                    "endpoint": "POST /v1/rollbacks/{id}/cancel",
                    "job_id": job_id,
                    "app_id": job.app_id,
                },
            )
            raise Forbidden(_not_allowed(source, job.app_id))
        try:
            cancelled = await self.store.cancel(job_id, reason=reason, by=source.name)
        except InvalidTransition as exc:
            raise Conflict(str(exc), code="not_cancellable") from None
        except JobNotFound:
            raise NotFound(f"no rollback job {job_id}") from None
        except StoreUnavailable as exc:
            raise _store_down() from exc
        log.info("job_cancelled", job_id=job_id, source=source.name, reason=reason)
        return _json(cancelled.to_dict())

    def auth_any(self, request: web.Request) -> SourceSettings:
        try:
            return self.auth.authenticate_any(request.headers.get(hdrs.AUTHORIZATION))
        except AuthFailure as exc:
            log.warning(
                "intake_rejected",
                method=request.method,
                path=request.path,
                status=401,
                code=exc.code,
                reason=exc.reason,
            )
            raise

    async def load(self, job_id: str) -> Job:
        if not is_valid_job_id(job_id):
            raise NotFound(f"no rollback job {job_id[:80]}")
        try:
            return await self.store.get(job_id)
        except JobNotFound:
            raise NotFound(f"no rollback job {job_id}") from None
        except StoreUnavailable as exc:
            raise _store_down() from exc


INTAKE_KEY: Final = web.AppKey("intake", _Intake)


def _store_down() -> Unavailable:
    """503 + Retry-After: the sender retries, and idempotency keys make the retry safe."""
    return Unavailable(
        "the job store cannot commit right now; retry later",
        code="store_unavailable",
        headers=retry_after_header(STORE_RETRY_AFTER_S),
    )


def _not_allowed(source: SourceSettings, app_id: str | None) -> str:
    if app_id is None:
        return (
            f"source {source.name!r} may only roll back listed apps: name the app "
            "(sae_app_id / app_id), a change order alone cannot be checked"
        )
    return f"source {source.name!r} may not roll back app {app_id!r}"


def _conflicts(job: Job, new: NewJob) -> bool:
    """Whether a job found by Idempotency-Key was created for a different target."""
    return (new.change_order_id is not None and job.change_order_id != new.change_order_id) or (
        new.app_id is not None and job.app_id is not None and job.app_id != new.app_id
    )


def build_intake_app(
    store: Store,
    metrics: Metrics,
    sources: Mapping[str, SourceSettings],
    *,
    max_body_bytes: int,
    default_region: str,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The aiohttp application serving the intake and results API (no I/O until served).

    ``clock`` (wall time, for signature windows) and ``monotonic`` (rate limits) exist for
    tests. Raises ``ConfigError`` when no source is configured: an intake nobody can
    authenticate to would either reject everything or, worse, tempt someone to open it.
    """
    if not sources:
        raise ConfigError(
            "no [sources.NAME] configured: the API refuses to start without at least one "
            "authenticated source (see config/example.toml)"
        )
    if max_body_bytes <= 0:
        raise ConfigError(f"max_body_bytes must be > 0, got {max_body_bytes}")
    if not is_valid_region(default_region):
        raise ConfigError(f"default region {default_region!r} is not a region id")
    register_secrets(
        secret.value
        for src in sources.values()
        for secret in (src.token, src.password, src.hmac_secret)
        if secret
    )
    intake = _Intake(
        store,
        metrics,
        sources,
        max_body_bytes=max_body_bytes,
        default_region=default_region,
        max_in_flight=max_in_flight,
        clock=clock,
        monotonic=monotonic,
    )
    app = web.Application(middlewares=[_error_middleware], client_max_size=max_body_bytes)
    app[INTAKE_KEY] = intake
    document = json.dumps(openapi.build_document()).encode()

    async def openapi_json(request: web.Request) -> web.StreamResponse:
        return web.Response(body=document, content_type="application/json")

    app.router.add_post("/v1/rollbacks", intake.intake(intake.submit))
    app.router.add_get("/v1/rollbacks", intake.list_jobs)
    app.router.add_get("/v1/rollbacks/{id}", intake.get_job)
    app.router.add_post("/v1/rollbacks/{id}/cancel", intake.intake(intake.cancel))
    webhook = intake.intake(intake.webhook)
    app.router.add_post("/v1/webhooks/{source}", webhook)
    app.router.add_put("/v1/webhooks/{source}", webhook)  # Grafana may be set to PUT
    add_ops_routes(app.router, store, metrics)
    app.router.add_get("/openapi.json", openapi_json)
    return app

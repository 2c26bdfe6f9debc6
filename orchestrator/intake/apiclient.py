"""A small asyncio client of the intake/results API, used by ``sae-rollback submit|status|list``.

It speaks only the public HTTP contract (contract.md "HTTP API"), so it works against any
running ``serve``/``api`` process. Every failure becomes an :class:`ApiClientError` with a
one-line message — the server's ``{"error": {"code", "message"}}`` when it sent one, or
what went wrong on the way — which the CLI prints before exiting 1.

Also here: :func:`format_job` and :func:`format_page`, the readable summaries the CLI
prints (the job's status, target, error and every attempt with its RequestId/TraceId).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import aiohttp
from yarl import URL

from orchestrator.errors import RollbackError

DEFAULT_SERVER: Final = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S: Final = 15.0


class ApiClientError(RollbackError):
    """The API refused a request or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Submitted:
    """The answer to a submit: the job as JSON and whether it already existed."""

    job: dict[str, Any]
    deduplicated: bool


def _base_url(server: str) -> URL:
    url = URL(server.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host:
        raise ApiClientError(f"server must be an http(s) URL such as {DEFAULT_SERVER}: {server!r}")
    return url


class ApiClient:
    """``async with ApiClient(server, token) as api: await api.submit(app_id=...)``."""

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._base = _base_url(server)
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (safe to call twice)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **(extra or {})}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        # ``path`` is already percent-encoded (see _segment): do not let yarl encode it again.
        url = URL(str(self._base).rstrip("/") + path, encoded=True)
        if query:
            url = url.with_query(dict(query))
        data = None if body is None else json.dumps(body).encode()
        request_headers = self._headers(headers)
        if data is not None:
            request_headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, url, data=data, headers=request_headers
            ) as response:
                text = await response.text()
                status = response.status
        except TimeoutError:
            raise ApiClientError(f"{self._base} did not answer within the timeout") from None
        except aiohttp.ClientError as exc:
            raise ApiClientError(f"cannot reach {self._base}: {exc}") from exc
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = None
        if status >= 400:
            raise _api_error(status, payload, text)
        if payload is None:
            raise ApiClientError(f"HTTP {status} without a JSON body from {self._base}")
        return status, payload

    async def submit(
        self,
        *,
        change_order_id: str | None = None,
        app_id: str | None = None,
        reason: str | None = None,
        requested_by: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """``POST /v1/rollbacks``: a new job (202) or the one it duplicates (200)."""
        body: dict[str, str] = {}
        for name, value in (
            ("change_order_id", change_order_id),
            ("app_id", app_id),
            ("reason", reason),
            ("requested_by", requested_by),
        ):
            if value is not None:
                body[name] = value
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        status, job = await self._request("POST", "/v1/rollbacks", body=body, headers=headers)
        return Submitted(job=job, deduplicated=bool(job.get("deduplicated", status == 200)))

    async def get(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/rollbacks/{id}``."""
        _, job = await self._request("GET", f"/v1/rollbacks/{_segment(job_id)}")
        return dict(job)

    async def list(
        self,
        *,
        status: str | None = None,
        app_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/rollbacks`` — one page: ``{"items": [...], "next_cursor"}``."""
        query = {
            k: str(v)
            for k, v in (
                ("status", status),
                ("app_id", app_id),
                ("limit", limit),
                ("cursor", cursor),
            )
            if v is not None
        }
        _, page = await self._request("GET", "/v1/rollbacks", query=query)
        return dict(page)

    async def cancel(self, job_id: str, reason: str | None = None) -> dict[str, Any]:
        """``POST /v1/rollbacks/{id}/cancel``."""
        body = {"reason": reason} if reason else None
        _, job = await self._request("POST", f"/v1/rollbacks/{_segment(job_id)}/cancel", body=body)
        return dict(job)


def _segment(value: str) -> str:
    """One path segment, percent-encoded so an odd id cannot change the path."""
    return quote(value, safe="")


def _api_error(status: int, payload: Any, text: str) -> ApiClientError:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = str(error.get("code", "error"))
        return ApiClientError(f"HTTP {status} {code}: {error['message']}", status=status, code=code)
    snippet = " ".join(text.split())[:200] or "no body"
    return ApiClientError(f"HTTP {status}: {snippet}", status=status)


# -- readable output ------------------------------------------------------------------------


def _target(job: Mapping[str, Any]) -> str:
    parts = []
    if job.get("app_id"):
        parts.append(f"app {job['app_id']}")
    if job.get("change_order_id"):
        parts.append(f"change order {job['change_order_id']}")
    return ", ".join(parts) or "no target"


def format_job(job: Mapping[str, Any]) -> str:
    """A readable multi-line summary of one job, attempts included."""
    lines = [
        f"job {job.get('id')}  {str(job.get('status', '?')).upper()}"
        + ("  (dry run)" if job.get("dry_run") else ""),
        f"  target:     {_target(job)} in {job.get('region')}",
        f"  source:     {job.get('source')}"
        + (f" (requested by {job['requested_by']})" if job.get("requested_by") else ""),
    ]
    if job.get("reason"):
        lines.append(f"  reason:     {job['reason']}")
    lines.append(f"  created:    {job.get('created_at')}")
    if job.get("finished_at"):
        lines.append(f"  finished:   {job['finished_at']}")
    elif job.get("next_attempt_at"):
        lines.append(f"  next try:   {job['next_attempt_at']}")
    error = job.get("error")
    if isinstance(error, dict) and (error.get("code") or error.get("message")):
        lines.append(f"  error:      {error.get('code')}: {error.get('message')}")
    attempts = job.get("attempts") or []
    lines.append(f"  attempts:   {len(attempts)}")
    for attempt in attempts:
        if not isinstance(attempt, dict):
            continue
        status = attempt.get("http_status")
        lines.append(
            f"    #{attempt.get('number')} {attempt.get('started_at')} {attempt.get('action')}"
            f" -> {attempt.get('outcome')}"
            f" (HTTP {status if status is not None else '-'}, {attempt.get('code') or '-'},"
            f" {attempt.get('duration_ms')} ms)"
        )
        lines.append(
            f"       request_id={attempt.get('request_id') or '-'}"
            f" trace_id={attempt.get('trace_id') or '-'}"
        )
        if attempt.get("message") and attempt.get("outcome") != "success":
            lines.append(f"       {attempt['message']}")
    return "\n".join(lines)


def format_page(page: Mapping[str, Any]) -> str:
    """One line per job, newest first, and how to get the next page."""
    items = page.get("items") or []
    if not items:
        return "no rollback jobs"
    lines = []
    for job in items:
        if not isinstance(job, dict):
            continue
        lines.append(
            f"{job.get('id')}  {job.get('status')!s:<10} {_target(job):<60} "
            f"{job.get('created_at')}  {job.get('source')}"
        )
    if page.get("next_cursor"):
        lines.append(f"(more: --cursor {page['next_cursor']})")
    return "\n".join(lines)

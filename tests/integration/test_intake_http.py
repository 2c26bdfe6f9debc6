"""The intake API over real HTTP with a real store: status codes, auth, dedupe, cancel, limits.

Every test serves ``build_intake_app`` on a loopback port over a migrated store. Tests of
behaviour that depends on the engine (commit, dedupe under concurrency, pagination, cancel)
run on SQLite and PostgreSQL; the rest on SQLite.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ConfigError
from orchestrator.intake import build_intake_app
from orchestrator.intake.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from orchestrator.jobs import JobStatus
from orchestrator.metrics import Metrics
from tests.contract.engines import Engine, engine_for, sqlite_engine
from tests.integration.intake_helpers import (
    AM_LIMITED_TOKEN,
    AM_PASSWORD,
    AM_TOKEN,
    BOT_TOKEN,
    GF_SECRET,
    OPS_TOKEN,
    SLOW_AM_TOKEN,
    SLOW_TOKEN,
    Api,
    alert,
    group,
    make_sources,
    serve_intake,
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    """The intake on each engine."""
    async with engine_for(request.param, tmp_path) as engine, serve_intake(engine) as api:
        yield api


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The intake on SQLite."""
    async with serve_intake(sqlite_engine(tmp_path)) as served:
        yield served


# -- POST /v1/rollbacks ---------------------------------------------------------------------


async def test_submit_answers_202_only_with_a_committed_job(any_api: Api) -> None:
    """A new request gets 202 with the job, and the job is already in the store."""
    reply = await any_api.call(
        "POST",
        "/v1/rollbacks",
        token=BOT_TOKEN,
        json_body={"change_order_id": "co-1", "app_id": "app-1", "reason": "bad deploy"},
    )
    assert reply.status == 202
    assert reply.body["deduplicated"] is False
    assert reply.body["status"] == "queued"
    stored = await any_api.store.get(reply.body["id"])
    assert (stored.change_order_id, stored.app_id, stored.source) == ("co-1", "app-1", "bot")
    assert stored.requested_by == "bot"
    assert any_api.counter("bot", "accepted") == 1


async def test_second_request_for_a_live_change_order_returns_it_with_200(any_api: Api) -> None:
    """One live job per change order: the duplicate gets the existing job and 200."""
    first = await any_api.call(
        "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"change_order_id": "co-1"}
    )
    second = await any_api.call(
        "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"change_order_id": "co-1"}
    )
    assert (first.status, second.status) == (202, 200)
    assert second.body["id"] == first.body["id"]
    assert second.body["deduplicated"] is True
    assert await any_api.job_count() == 1


async def test_idempotency_key_replays_and_refuses_reuse(any_api: Api) -> None:
    """A replayed Idempotency-Key returns the first job; reuse for another target is 409."""
    headers = {"Idempotency-Key": "incident-42"}
    first = await any_api.call(
        "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "a"}, headers=headers
    )
    replay = await any_api.call(
        "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "a"}, headers=headers
    )
    reuse = await any_api.call(
        "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "b"}, headers=headers
    )
    assert (first.status, replay.status, reuse.status) == (202, 200, 409)
    assert replay.body["id"] == first.body["id"]
    assert reuse.body["error"]["code"] == "idempotency_key_reused"
    bad_key = await any_api.call(
        "POST",
        "/v1/rollbacks",
        token=BOT_TOKEN,
        json_body={"app_id": "c"},
        headers={"Idempotency-Key": "has space"},
    )
    assert bad_key.status == 400
    assert await any_api.job_count() == 1


async def test_concurrent_identical_deliveries_make_one_job(any_api: Api) -> None:
    """Twenty identical Alertmanager deliveries at once: all 202, one job, one id."""
    payload = group(alert(app_id="app-1", change_order_id="co-9"))
    replies = await asyncio.gather(
        *(
            any_api.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=payload)
            for _ in range(20)
        )
    )
    assert {r.status for r in replies} == {202}
    ids = {job_id for r in replies for job_id in r.body["accepted"] + r.body["deduplicated"]}
    assert len(ids) == 1
    assert sum(len(r.body["accepted"]) for r in replies) == 1
    assert await any_api.job_count() == 1


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_two_replicas_receiving_the_same_alert_make_one_job(
    kind: str, tmp_path: Path
) -> None:
    """An HA pair delivering to two intake replicas on one store still makes one job."""
    payload = group(alert(app_id="app-1", change_order_id="co-ha"))
    async with (
        engine_for(kind, tmp_path) as engine,
        serve_intake(engine) as left,
        serve_intake(engine) as right,
    ):
        replies = await asyncio.gather(
            *(
                replica.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=payload)
                for replica in (left, right) * 10
            )
        )
        assert {r.status for r in replies} == {202}
        ids = {job_id for r in replies for job_id in r.body["accepted"] + r.body["deduplicated"]}
        assert len(ids) == 1
        assert sum(len(r.body["accepted"]) for r in replies) == 1
        assert await left.job_count() == 1


# -- webhooks -----------------------------------------------------------------------------


async def test_alertmanager_delivery_lists_accepted_deduplicated_and_ignored(api: Api) -> None:
    """Firing alerts with targets become jobs; the rest are listed with their reasons."""
    payload = group(
        alert(app_id="app-1", starts_at="2024-05-01T10:00:00Z"),
        alert(app_id="app-1", name="Latency", starts_at="2024-05-01T10:01:00Z"),
        alert(app_id=None, name="DiskFull"),
    )
    reply = await api.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=payload)
    assert reply.status == 202
    assert len(reply.body["accepted"]) == 1
    # The second alert names the same app: one live app-only job per app.
    assert reply.body["deduplicated"] == reply.body["accepted"]
    [ignored] = reply.body["ignored"]
    assert "no target" in ignored["reason"]
    assert ignored["fingerprint"]
    job = await api.store.get(reply.body["accepted"][0])
    assert job.reason == "alertmanager alert HighErrorRate firing: error rate above 5%"
    assert job.requested_by == "alertmanager:sae-rollback"
    assert (api.counter("am", "accepted"), api.counter("am", "deduplicated")) == (1, 1)
    assert api.counter("am", "ignored") == 1


async def test_repeat_interval_resend_and_ha_duplicate_make_no_second_job(api: Api) -> None:
    """The same alert re-sent (repeat_interval, or the other HA member) maps to its job."""
    payload = group(alert(app_id="app-1"))
    first = await api.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=payload)
    # Same alert, resent after the job finished: the idempotency key still maps to it.
    await api.store.cancel(first.body["accepted"][0], reason="test", by="test")
    again = await api.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=payload)
    assert again.body["deduplicated"] == first.body["accepted"]
    assert await api.job_count() == 1
    # A new episode of the alert (new startsAt) is a new request.
    new_episode = group(alert(app_id="app-1", starts_at="2024-05-02T10:00:00Z"))
    third = await api.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=new_episode)
    assert len(third.body["accepted"]) == 1
    assert third.body["accepted"] != first.body["accepted"]


async def test_resend_after_a_restart_maps_to_the_same_job(tmp_path: Path) -> None:
    """A re-send reaching a restarted intake (nothing remembered in memory) finds the job."""
    engine = sqlite_engine(tmp_path)
    payload = group(alert(app_id="app-1"))
    async with serve_intake(engine) as first_life:
        first = await first_life.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=payload)
    async with serve_intake(engine) as second_life:
        again = await second_life.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=payload)
        assert again.body["deduplicated"] == first.body["accepted"]
        assert await second_life.job_count() == 1


async def test_resolved_alert_cancels_its_queued_job_when_configured(api: Api) -> None:
    """With cancel_on_resolved the resolved alert cancels the job its firing created."""
    fired = await api.call(
        "POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=group(alert(app_id="app-1"))
    )
    [job_id] = fired.body["accepted"]
    resolved = await api.call(
        "POST",
        "/v1/webhooks/am",
        token=AM_TOKEN,
        json_body=group(alert(app_id="app-1", status="resolved")),
    )
    assert resolved.status == 202
    assert resolved.body["cancelled"] == [job_id]
    assert resolved.body["accepted"] == []
    assert "cancelled job" in resolved.body["ignored"][0]["reason"]
    assert (await api.store.get(job_id)).status is JobStatus.CANCELLED
    again = await api.call(
        "POST",
        "/v1/webhooks/am",
        token=AM_TOKEN,
        json_body=group(alert(app_id="app-1", status="resolved")),
    )
    assert again.body["cancelled"] == []
    assert "already started or finished" in again.body["ignored"][0]["reason"]


async def test_resolved_alert_never_starts_a_rollback(api: Api) -> None:
    """A resolved-only delivery creates nothing, with or without cancel_on_resolved."""
    headers = {"Authorization": "Basic " + base64.b64encode(f"am:{AM_PASSWORD}".encode()).decode()}
    reply = await api.call(
        "POST",
        "/v1/webhooks/am-basic",
        json_body=group(alert(app_id="app-1", status="resolved")),
        headers=headers,
    )
    assert reply.status == 202
    assert reply.body["accepted"] == reply.body["cancelled"] == []
    assert reply.body["ignored"][0]["reason"].startswith("resolved")
    assert await api.job_count() == 0


async def test_grafana_signed_delivery_is_processed_once(api: Api) -> None:
    """A delivery signed over timestamp:body is accepted; its replay gets the same answer."""
    # Compact JSON: re-serialising it would add spaces, so only raw-byte checking verifies.
    raw = b'{"version":"1","orgId":1,"status":"firing","alerts":[{"status":"firing",' + (
        b'"labels":{"sae_app_id":"app-1"},"startsAt":"2024-05-01T10:00:00Z","values":{"B":4}}]}'
    )
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(GF_SECRET.encode(), raw, stamp),
        TIMESTAMP_HEADER: stamp,
    }
    first = await api.call("POST", "/v1/webhooks/gf", data=raw, headers=headers)
    assert first.status == 202
    job = await api.store.get(first.body["accepted"][0])
    assert job.dry_run is True  # the gf source is a dry-run source
    assert job.reason.endswith("(B=4)")
    await api.store.cancel(job.id, reason="test", by="test")
    replay = await api.call("POST", "/v1/webhooks/gf", data=raw, headers=headers)
    assert (replay.status, replay.body) == (202, first.body)
    assert await api.job_count() == 1
    assert len(await api.store.audit(job.id)) == 2  # accepted, cancelled: the replay did nothing


@pytest.mark.parametrize(
    ("source", "headers", "why"),
    [
        ("am", {}, "no credentials"),
        ("am", {"Authorization": "Bearer wrong"}, "wrong token"),
        ("am", {"Authorization": f"Bearer {BOT_TOKEN}"}, "another source's token"),
        ("nope", {"Authorization": f"Bearer {AM_TOKEN}"}, "unknown source"),
        ("am-basic", {"Authorization": "Basic " + base64.b64encode(b"am:x").decode()}, "basic"),
        ("gf", {SIGNATURE_HEADER: "0" * 64}, "wrong signature"),
        ("gf", {}, "missing signature"),
    ],
)
async def test_auth_matrix_refuses_with_401_and_creates_nothing(
    api: Api, source: str, headers: dict[str, str], why: str
) -> None:
    """Every way of not being the source ends in 401, no job, and an unauthorized count."""
    reply = await api.call(
        "POST", f"/v1/webhooks/{source}", json_body=group(alert()), headers=headers
    )
    assert reply.status == 401, why
    assert reply.body["error"]["code"] == "unauthorized"
    assert "WWW-Authenticate" in reply.headers
    assert await api.job_count() == 0
    label = source if source != "nope" else "unknown"
    assert api.counter(label, "unauthorized") == 1


async def test_secrets_from_files_authenticate(tmp_path: Path) -> None:
    """A token and an HMAC secret read from files work like inline ones."""
    (tmp_path / "am-token").write_text("from-a-file-token-01\n")
    (tmp_path / "gf-secret").write_text("from-a-file-secret-01\n")
    sources = make_sources(
        {
            "am": {"kind": "alertmanager", "token_file": str(tmp_path / "am-token")},
            "gf": {"kind": "grafana", "hmac_secret_file": str(tmp_path / "gf-secret")},
        }
    )
    async with serve_intake(sqlite_engine(tmp_path), sources=sources) as api:
        by_token = await api.call(
            "POST", "/v1/webhooks/am", token="from-a-file-token-01", json_body=group(alert())
        )
        raw = b'{"version":"1","alerts":[]}'
        by_signature = await api.call(
            "POST",
            "/v1/webhooks/gf",
            data=raw,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(b"from-a-file-secret-01", raw),
            },
        )
    assert (by_token.status, by_signature.status) == (202, 202)


async def test_stale_grafana_timestamp_is_refused(api: Api) -> None:
    """A correctly signed delivery whose timestamp is 10 minutes old gets 401."""
    raw = b'{"version":"1","alerts":[]}'
    stamp = str(int(time.time()) - 600)
    reply = await api.call(
        "POST",
        "/v1/webhooks/gf",
        data=raw,
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(GF_SECRET.encode(), raw, stamp),
            TIMESTAMP_HEADER: stamp,
        },
    )
    assert reply.status == 401
    assert "server clock" in reply.body["error"]["message"]


# -- authorisation --------------------------------------------------------------------------


async def test_app_outside_allowed_apps_is_403_with_an_audit_row(any_api: Api) -> None:
    """A source asking for an app it may not roll back gets 403 and leaves an audit row."""
    reply = await any_api.call(
        "POST", "/v1/rollbacks", token=OPS_TOKEN, json_body={"app_id": "app-other"}
    )
    assert reply.status == 403
    co_only = await any_api.call(
        "POST", "/v1/rollbacks", token=OPS_TOKEN, json_body={"change_order_id": "co-1"}
    )
    assert co_only.status == 403  # the app cannot be checked, so it is not allowed
    allowed = await any_api.call(
        "POST", "/v1/rollbacks", token=OPS_TOKEN, json_body={"app_id": "app-ok"}
    )
    assert allowed.status == 202
    rejections = await any_api.rejections()
    assert [(r["actor"], r["reason"], r["app_id"]) for r in rejections] == [
        ("ops", "app_not_allowed", "app-other"),
        ("ops", "app_not_allowed", None),
    ]
    assert any_api.counter("ops", "forbidden") == 2
    assert await any_api.job_count() == 1


async def test_webhook_with_only_forbidden_targets_is_403(api: Api) -> None:
    """A delivery whose every target is forbidden is refused, audited, and creates nothing."""
    reply = await api.call(
        "POST",
        "/v1/webhooks/am-limited",
        token=AM_LIMITED_TOKEN,
        json_body=group(alert(app_id="app-x"), alert(app_id="app-y", name="Other")),
    )
    assert reply.status == 403
    assert "may not roll back app 'app-x'" in reply.body["error"]["message"]
    assert [r["app_id"] for r in await api.rejections()] == ["app-x", "app-y"]
    assert api.counter("am-limited", "forbidden") == 2
    assert await api.job_count() == 0


async def test_webhook_with_mixed_targets_runs_the_allowed_ones(api: Api) -> None:
    """Allowed targets still roll back; forbidden ones are listed in ignored and audited."""
    reply = await api.call(
        "POST",
        "/v1/webhooks/am-limited",
        token=AM_LIMITED_TOKEN,
        json_body=group(alert(app_id="app-x"), alert(app_id="app-ok", name="Other")),
    )
    assert reply.status == 202
    assert len(reply.body["accepted"]) == 1
    [ignored] = reply.body["ignored"]
    assert "may not roll back app 'app-x'" in ignored["reason"]
    assert [r["app_id"] for r in await api.rejections()] == ["app-x"]


async def test_endpoints_are_reserved_to_their_source_kinds(api: Api) -> None:
    """Webhook sources cannot submit or cancel; api sources cannot post webhooks."""
    submit = await api.call("POST", "/v1/rollbacks", token=AM_TOKEN, json_body={"app_id": "a"})
    webhook = await api.call("POST", "/v1/webhooks/bot", token=BOT_TOKEN, json_body=group())
    assert (submit.status, webhook.status) == (403, 403)
    assert await api.job_count() == 0
    assert [(r["actor"], r["reason"], r["endpoint"]) for r in await api.rejections()] == [
        ("am", "endpoint_not_allowed", "POST /v1/rollbacks"),
        ("bot", "endpoint_not_allowed", "POST /v1/webhooks"),
    ]


# -- limits ---------------------------------------------------------------------------------


async def test_oversized_bodies_are_413_by_length_and_when_chunked(api: Api) -> None:
    """A big Content-Length is refused unread; a chunked body is cut off at the cap."""
    big = b'{"alerts": [' + b" " * (70 * 1024) + b"]}"
    by_length = await api.call(
        "POST",
        "/v1/webhooks/am",
        token=AM_TOKEN,
        data=big,
        headers={"Content-Type": "application/json"},
    )

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 8192

    chunked = await api.call(
        "POST",
        "/v1/webhooks/am",
        token=AM_TOKEN,
        data=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert (by_length.status, chunked.status) == (413, 413)
    assert by_length.body["error"]["code"] == "payload_too_large"
    assert api.counter("am", "invalid") == 2


async def test_non_json_content_type_is_415(api: Api) -> None:
    """Form posts and bodies without a content type are refused."""
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        reply = await api.call(
            "POST",
            "/v1/rollbacks",
            token=BOT_TOKEN,
            data=b'{"app_id": "a"}',
            headers={"Content-Type": content_type},
        )
        assert reply.status == 415
    assert await api.job_count() == 0


async def test_bad_json_is_400_and_schema_errors_are_422(api: Api) -> None:
    """Unreadable JSON is a 400; readable JSON of the wrong shape a 422."""
    for raw in (b"{", b"[1,", b"NaN", b'{"a": Infinity}', b"\xff\xfe"):
        reply = await api.call(
            "POST",
            "/v1/webhooks/am",
            token=AM_TOKEN,
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        assert reply.status == 400, raw
        assert reply.body["error"]["code"] == "invalid_json"
    too_deep = await api.call(  # 30,000 nested lists: past Python's recursion limit
        "POST",
        "/v1/rollbacks",
        token=BOT_TOKEN,
        data=b"[" * 30_000 + b"]" * 30_000,
        headers={"Content-Type": "application/json"},
    )
    assert (too_deep.status, too_deep.body["error"]["code"]) == (400, "invalid_json")
    for body in ({"alerts": "x"}, {"version": "3", "alerts": []}, ["x"]):
        reply = await api.call("POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=body)
        assert reply.status == 422, body
    reply = await api.call("POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"appId": "x"})
    assert reply.status == 422
    assert "appId" in reply.body["error"]["message"]


async def test_rate_limit_is_429_for_api_and_503_for_webhooks(api: Api) -> None:
    """Past its burst, an api source gets 429 and a webhook source 503, both with Retry-After."""
    statuses = [
        (await api.call("POST", "/v1/rollbacks", token=SLOW_TOKEN, json_body={"app_id": f"a{i}"}))
        for i in range(3)
    ]
    assert [r.status for r in statuses] == [202, 202, 429]
    assert int(statuses[2].headers["Retry-After"]) >= 1
    hooks = [
        await api.call("POST", "/v1/webhooks/slow-am", token=SLOW_AM_TOKEN, json_body=group())
        for _ in range(2)
    ]
    assert [r.status for r in hooks] == [202, 503]
    assert hooks[1].body["error"]["code"] == "rate_limited"
    assert int(hooks[1].headers["Retry-After"]) >= 1
    # Another source is not affected by those limits.
    other = await api.call("POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "z"})
    assert other.status == 202
    assert api.counter("slow", "overloaded") == api.counter("slow-am", "overloaded") == 1


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    """404 and 405 come back in the contract's error shape, 405 with Allow."""
    missing = await api.call("GET", "/v2/nothing")
    wrong_method = await api.call("DELETE", "/v1/rollbacks", token=BOT_TOKEN)
    assert (missing.status, missing.body["error"]["code"]) == (404, "not_found")
    assert (wrong_method.status, wrong_method.body["error"]["code"]) == (405, "method_not_allowed")
    assert "POST" in wrong_method.headers["Allow"]


# -- results --------------------------------------------------------------------------------


async def test_get_and_list_with_filters_and_pagination(any_api: Api) -> None:
    """Any source's token reads jobs; pages walk every job once, newest first."""
    ids = []
    for i in range(7):
        reply = await any_api.call(
            "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"change_order_id": f"co-{i}"}
        )
        ids.append(reply.body["id"])
    one = await any_api.call("GET", f"/v1/rollbacks/{ids[0]}", token=AM_TOKEN)
    assert (one.status, one.body["change_order_id"], one.body["attempts"]) == (200, "co-0", [])
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await any_api.call("GET", f"/v1/rollbacks{query}", token=AM_TOKEN)
        assert page.status == 200
        seen += [job["id"] for job in page.body["items"]]
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    await any_api.store.cancel(ids[3], reason="test", by="test")
    cancelled = await any_api.call("GET", "/v1/rollbacks?status=cancelled", token=BOT_TOKEN)
    assert [job["id"] for job in cancelled.body["items"]] == [ids[3]]
    bad = await any_api.call("GET", "/v1/rollbacks?cursor=bm9wZQ", token=BOT_TOKEN)
    assert (bad.status, bad.body["error"]["code"]) == (400, "invalid_cursor")
    missing = await any_api.call("GET", "/v1/rollbacks/0000-nope", token=BOT_TOKEN)
    assert missing.status == 404
    anonymous = await any_api.call("GET", f"/v1/rollbacks/{ids[0]}")
    assert anonymous.status == 401


async def test_cancel_rules(any_api: Api) -> None:
    """api sources cancel queued jobs (200), not twice (409), not unknown (404), not others'."""
    made = await any_api.call(
        "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "app-1"}
    )
    job_id = made.body["id"]
    by_webhook_source = await any_api.call("POST", f"/v1/rollbacks/{job_id}/cancel", token=AM_TOKEN)
    by_restricted = await any_api.call("POST", f"/v1/rollbacks/{job_id}/cancel", token=OPS_TOKEN)
    assert (by_webhook_source.status, by_restricted.status) == (403, 403)
    cancelled = await any_api.call(
        "POST",
        f"/v1/rollbacks/{job_id}/cancel",
        token=BOT_TOKEN,
        json_body={"reason": "false alarm"},
    )
    assert (cancelled.status, cancelled.body["status"]) == (200, "cancelled")
    again = await any_api.call("POST", f"/v1/rollbacks/{job_id}/cancel", token=BOT_TOKEN)
    assert (again.status, again.body["error"]["code"]) == (409, "not_cancellable")
    unknown = await any_api.call(
        "POST", "/v1/rollbacks/01234567-89ab-7def-8123-456789abcdef/cancel", token=BOT_TOKEN
    )
    assert unknown.status == 404
    bad_body = await any_api.call(
        "POST", f"/v1/rollbacks/{job_id}/cancel", token=BOT_TOKEN, json_body={"why": "x"}
    )
    assert bad_body.status == 422


async def test_health_readiness_metrics_and_openapi_need_no_credentials(api: Api) -> None:
    """The operational endpoints answer without a token."""
    assert (await api.call("GET", "/healthz")).body == {"status": "ok"}
    assert (await api.call("GET", "/readyz")).body == {"status": "ready"}
    await api.call("POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "a"})
    metrics = await api.call("GET", "/metrics")
    assert metrics.status == 200
    assert 'sae_rollback_intake_requests_total{outcome="accepted",source="bot"} 1.0' in metrics.body
    document = await api.call("GET", "/openapi.json")
    assert document.body["openapi"].startswith("3.")
    await api.store.close()
    not_ready = await api.call("GET", "/readyz")
    assert (not_ready.status, not_ready.body["error"]["code"]) == (503, "not_ready")


# -- the store cannot commit -----------------------------------------------------------------


@pytest.fixture
def locked_sqlite(tmp_path: Path) -> Iterator[tuple[Engine, sqlite3.Connection]]:
    """A SQLite engine plus a second connection that can hold its write lock."""
    engine = sqlite_engine(tmp_path)
    holder = sqlite3.connect(str(tmp_path / "store.db"), isolation_level=None)
    try:
        yield engine, holder
    finally:
        holder.close()


async def test_store_that_cannot_commit_gives_503_and_the_retry_counts_once(
    locked_sqlite: tuple[Engine, sqlite3.Connection],
) -> None:
    """While another process holds the write lock: 503 + Retry-After; afterwards one job."""
    engine, holder = locked_sqlite
    raw = (
        b'{"version":"1","alerts":[{"status":"firing","labels":{"sae_app_id":"app-2"},'
        b'"startsAt":"2024-05-01T10:00:00Z"}]}'
    )
    signed = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(GF_SECRET.encode(), raw)}
    async with serve_intake(engine, store_options={"busy_timeout_s": 0.2}) as api:
        holder.execute("BEGIN IMMEDIATE")
        try:
            refused = await api.call(
                "POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=group(alert())
            )
            refused_signed = await api.call("POST", "/v1/webhooks/gf", data=raw, headers=signed)
        finally:
            holder.execute("ROLLBACK")
        assert (refused.status, refused.body["error"]["code"]) == (503, "store_unavailable")
        assert refused.headers["Retry-After"] == "5"
        assert refused_signed.status == 503
        assert await api.job_count() == 0
        # Alertmanager retries the 5xx: accepted now, exactly once.
        retried = await api.call(
            "POST", "/v1/webhooks/am", token=AM_TOKEN, json_body=group(alert())
        )
        assert (retried.status, len(retried.body["accepted"])) == (202, 1)
        # Grafana's retry of the very same signed request is not mistaken for a replay.
        retried_signed = await api.call("POST", "/v1/webhooks/gf", data=raw, headers=signed)
        assert retried_signed.status == 202
        assert await api.job_count() == 2
        assert api.counter("am", "overloaded") == 1


async def test_requests_beyond_the_in_flight_cap_are_shed_with_503(
    locked_sqlite: tuple[Engine, sqlite3.Connection],
) -> None:
    """With one request stuck on the store, the next one is shed at once with 503."""
    engine, holder = locked_sqlite
    async with serve_intake(engine, store_options={"busy_timeout_s": 1.0}, max_in_flight=1) as api:
        holder.execute("BEGIN IMMEDIATE")
        try:
            stuck = asyncio.ensure_future(
                api.call("POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "a"})
            )
            await asyncio.sleep(0.3)  # the first request is now waiting for the lock
            started = time.monotonic()
            shed = await api.call(
                "POST", "/v1/rollbacks", token=BOT_TOKEN, json_body={"app_id": "b"}
            )
            shed_after = time.monotonic() - started
        finally:
            await asyncio.sleep(0)
        first = await stuck
        holder.execute("ROLLBACK")
        assert (shed.status, shed.body["error"]["code"]) == (503, "overloaded")
        assert shed.headers["Retry-After"] == "1"
        assert shed_after < 0.5
        assert first.status == 503  # its own lock wait ran out


def test_no_sources_means_no_service(tmp_path: Path) -> None:
    """Building the intake without any source refuses to start (ConfigError)."""
    store: Any = object()
    with pytest.raises(ConfigError, match=r"no \[sources.NAME\] configured"):
        build_intake_app(store, Metrics(), {}, max_body_bytes=1024, default_region="cn-hangzhou")

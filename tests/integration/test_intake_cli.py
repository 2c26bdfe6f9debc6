"""The CLI's API commands (submit, status, list) as subprocesses against a served intake."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.intake.apiclient import ApiClient, ApiClientError, format_job, format_page
from orchestrator.jobs import AttemptIn, AttemptOutcome
from tests.contract.engines import sqlite_engine
from tests.integration.intake_helpers import AM_TOKEN, BOT_TOKEN, Api, serve_intake

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Ran:
    """A finished CLI run."""

    code: int
    out: str
    err: str


async def cli(*args: str, **env: str) -> Ran:
    """Run ``python -m orchestrator ARGS`` without blocking the loop that serves the API."""
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SAE_ROLLBACK_") and "proxy" not in k.lower()
    }
    environment.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The intake on SQLite."""
    async with serve_intake(sqlite_engine(tmp_path)) as served:
        yield served


async def test_submit_status_and_list_through_the_cli(api: Api) -> None:
    """submit prints the new job, status shows it with its attempts, list includes it."""
    submitted = await cli(
        "submit", "--app-id", "demo-app", "--reason", "bad deploy", "--server", api.base,
        "--token", BOT_TOKEN,
    )  # fmt: skip
    assert submitted.code == 0, submitted.err
    assert submitted.out.startswith("rollback accepted: job ")
    job_id = submitted.out.split()[3]
    job = await api.store.get(job_id)
    assert (job.app_id, job.reason) == ("demo-app", "bad deploy")

    again = await cli(
        "submit", "--app-id", "demo-app", "--json", "--server", api.base,
        SAE_ROLLBACK_TOKEN=BOT_TOKEN,
    )  # fmt: skip
    assert again.code == 0, again.err
    assert json.loads(again.out)["id"] == job_id
    assert json.loads(again.out)["deduplicated"] is True

    shown = await cli("status", job_id, SAE_ROLLBACK_SERVER=api.base, SAE_ROLLBACK_TOKEN=AM_TOKEN)
    assert shown.code == 0, shown.err
    assert f"job {job_id}  QUEUED" in shown.out
    assert "attempts:   0" in shown.out

    listed = await cli("list", "--status", "queued", "--server", api.base, "--token", AM_TOKEN)
    assert listed.code == 0, listed.err
    assert job_id in listed.out


async def test_cli_failures_exit_1_with_one_line_and_usage_errors_exit_2(api: Api) -> None:
    """A refused or unreachable API is exit 1 with one line; bad usage is exit 2."""
    no_token = await cli("submit", "--change-order-id", "co-1", "--server", api.base)
    assert no_token.code == 1
    assert no_token.err.strip().splitlines() == [
        "sae-rollback: HTTP 401 unauthorized: missing or invalid credentials "
        "(pass --token or set SAE_ROLLBACK_TOKEN)"
    ]
    missing = await cli("status", "nope", "--server", api.base, "--token", BOT_TOKEN)
    assert (missing.code, missing.err.count("\n")) == (1, 1)
    assert "HTTP 404 not_found" in missing.err
    unreachable = await cli("list", "--server", "http://127.0.0.1:9", "--token", BOT_TOKEN)
    assert unreachable.code == 1
    assert "cannot reach http://127.0.0.1:9" in unreachable.err
    both = await cli("submit", "--app-id", "a", "--change-order-id", "b", "--token", BOT_TOKEN)
    neither = await cli("submit", "--token", BOT_TOKEN)
    bad_status = await cli("list", "--status", "done")
    assert (both.code, neither.code, bad_status.code) == (2, 2, 2)
    assert await api.job_count() == 0


async def test_input_the_server_refuses_is_a_usage_error(api: Api) -> None:
    """An app id the API rejects (422) exits 2 with the server's reason on one line."""
    bad = await cli("submit", "--app-id", "bad id!", "--server", api.base, "--token", BOT_TOKEN)
    assert bad.code == 2
    assert bad.err.count("\n") == 1
    assert "HTTP 422" in bad.err
    assert await api.job_count() == 0


async def test_submit_hint_works_as_printed(api: Api) -> None:
    """The follow-up line names what status needs: with --token it asks for the token."""
    flag = await cli("submit", "--app-id", "app-a", "--server", api.base, "--token", BOT_TOKEN)
    hint = flag.out.splitlines()[1]
    assert hint.startswith("follow it with: sae-rollback status ")
    assert "--token TOKEN" in hint
    assert BOT_TOKEN not in flag.out  # a secret is never echoed
    env = await cli(
        "submit", "--app-id", "app-b", "--server", api.base, SAE_ROLLBACK_TOKEN=BOT_TOKEN
    )
    command = env.out.splitlines()[1].removeprefix("follow it with: ")
    assert "--token" not in command
    shown = await cli(*command.split()[1:], SAE_ROLLBACK_TOKEN=BOT_TOKEN)
    assert shown.code == 0, shown.err


async def test_logging_options_go_before_or_after_the_command(api: Api) -> None:
    """`--log-format` is accepted on either side of the subcommand."""
    for args in (
        ("--log-format", "json", "list", "--server", api.base, "--token", BOT_TOKEN),
        ("list", "--log-format", "json", "--server", api.base, "--token", BOT_TOKEN),
        ("--log-format", "console", "list", "--log-format", "json", "--server", api.base),
    ):
        ran = await cli(*args, SAE_ROLLBACK_TOKEN=BOT_TOKEN)
        assert ran.code == 0, (args, ran.err)
    bad = await cli("list", "--log-format", "xml")
    assert bad.code == 2


async def test_api_client_round_trip_and_errors(api: Api) -> None:
    """The client submits, reads, lists and cancels, and turns refusals into ApiClientError."""
    async with ApiClient(api.base, BOT_TOKEN) as client:
        first = await client.submit(change_order_id="co-7", reason="r", idempotency_key="k-1")
        replay = await client.submit(change_order_id="co-7", idempotency_key="k-1")
        assert (first.deduplicated, replay.deduplicated) == (False, True)
        assert replay.job["id"] == first.job["id"]
        assert (await client.get(first.job["id"]))["change_order_id"] == "co-7"
        page = await client.list(status="queued", limit=5)
        assert [j["id"] for j in page["items"]] == [first.job["id"]]
        cancelled = await client.cancel(first.job["id"], reason="false alarm")
        assert cancelled["status"] == "cancelled"
        with pytest.raises(ApiClientError) as info:
            await client.cancel(first.job["id"])
        assert (info.value.status, info.value.code) == (409, "not_cancellable")
        with pytest.raises(ApiClientError, match="HTTP 404"):
            await client.get("a/../../metrics")  # percent-encoded: cannot escape the path
    with pytest.raises(ApiClientError, match="http"):
        ApiClient("ftp://example.invalid")


async def test_status_summary_lists_attempts_with_ids(api: Api) -> None:
    """The readable status shows each attempt's action, outcome, code and request ids."""
    async with ApiClient(api.base, BOT_TOKEN) as client:
        submitted = await client.submit(app_id="app-1")
        claimed = await api.store.claim("test-worker", 30, 1)
        [lease] = claimed
        await api.store.record_attempt(
            lease.job.id,
            lease.token,
            AttemptIn(
                action="AbortAndRollbackChangeOrder",
                started_at=datetime.now(UTC),
                duration_ms=41,
                outcome=AttemptOutcome.RETRY,
                http_status=400,
                code="Application.ChangerOrderRunning",
                message="another change is running",
                request_id="REQ-1",
                trace_id="TRACE-1",
            ),
        )
        text = format_job(await client.get(submitted.job["id"]))
        listing = format_page(await client.list())
    assert "RUNNING" in text
    assert "#1 " in text
    assert "AbortAndRollbackChangeOrder -> retry (HTTP 400, Application.ChangerOrderRunning" in text
    assert "request_id=REQ-1 trace_id=TRACE-1" in text
    assert "another change is running" in text
    assert submitted.job["id"] in listing
    assert format_page({"items": [], "next_cursor": None}) == "no rollback jobs"

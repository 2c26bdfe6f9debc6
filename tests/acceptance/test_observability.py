"""A running service, observed from outside: its logs leak no secret, its /metrics pass promtool.

``sae-rollback serve`` runs as a real process against a simulator in the test process. The
canary is configured as the SAE access key secret (through the credential chain's
environment), as an `api` source's bearer token and as a Grafana source's HMAC secret; the
test runs a real rollback and a few authentication failures, then searches everything the
process printed, in both log renderers. It guards the whole path (what any component
chooses to log or answer); that the redaction processor itself removes secrets handed to
it is shown by tests/unit/test_logging.py, which fails when the processor is taken out.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.simulator import SimulatorServer

CLI = str(Path(sys.executable).with_name("sae-rollback"))
ACCESS_KEY_ID = "LTAI5tCANARYKEY000000"
CANARY = "CANARY-9d1f7c2e-secret-value"
API_TOKEN = f"tok-{CANARY}"
HMAC_SECRET = f"hmac-{CANARY}"
SAE_SECRET = f"sae-{CANARY}"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, endpoint: str, port: int) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}

[store]
url = "sqlite:///{tmp_path / "jobs.db"}"

[sae]
endpoint = "{endpoint}"
protocol = "http"
connect_timeout_s = 1
read_timeout_s = 2
calls_per_minute = 0

[retry]
initial_s = 0.1
max_interval_s = 0.5
max_elapsed_s = 30

[verify]
poll_interval_s = 0.2
timeout_s = 30

[sources.bot]
kind = "api"
token = "{API_TOKEN}"

[sources.grafana]
kind = "grafana"
hmac_secret = "{HMAC_SECRET}"
"""
    )
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=ACCESS_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=SAE_SECRET,
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
        ALIBABA_CLOUD_CLI_PROFILE_DISABLED="true",
    )
    return env


@asynccontextmanager
async def _serve(tmp_path: Path, endpoint: str, log_format: str) -> AsyncIterator[tuple[str, Path]]:
    """``sae-rollback serve`` until the block ends; yields (base URL, file with its output)."""
    port = _free_port()
    config = _config(tmp_path, endpoint, port)
    out = tmp_path / f"serve-{log_format}.log"
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "--log-format",
            log_format,
            "--log-level",
            "debug",
            "serve",
            "--config",
            str(config),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                assert proc.returncode is None, out.read_text(errors="replace")
                try:
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "serve did not become ready"
                await asyncio.sleep(0.1)
        yield base, out
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, out.read_text(errors="replace")


async def _rollback_and_auth_failures(base: str, sim: SimulatorServer) -> dict[str, Any]:
    """One real rollback to `succeeded`, then refused requests that carry secrets around."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{sim.base_url}/_sim/change-orders", json={"app_id": "app-obs", "rollback_s": 0.2}
        ) as resp:
            assert resp.status == 200
            change_order_id = (await resp.json())["change_order_id"]
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        async with http.post(
            f"{base}/v1/rollbacks",
            json={"change_order_id": change_order_id, "reason": "observability test"},
            headers=auth,
        ) as resp:
            assert resp.status == 202, await resp.text()
            job_id = (await resp.json())["id"]
        deadline = time.monotonic() + 30
        while True:
            async with http.get(f"{base}/v1/rollbacks/{job_id}", headers=auth) as resp:
                job: dict[str, Any] = await resp.json()
            if job["status"] in {"succeeded", "failed", "skipped", "cancelled"}:
                break
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.1)
        # Authentication failures: a near-miss token, a bad signature, basic auth with the
        # canary as password. None may echo what was sent or what was expected.
        for headers in (
            {"Authorization": f"Bearer {API_TOKEN}x"},
            {"Authorization": f"Bearer {CANARY}"},
        ):
            async with http.post(
                f"{base}/v1/rollbacks", json={"app_id": "app-obs"}, headers=headers
            ) as resp:
                assert resp.status == 401
                assert CANARY not in await resp.text()
        async with http.post(
            f"{base}/v1/webhooks/grafana",
            data=b'{"alerts": []}',
            headers={"Content-Type": "application/json", "X-Grafana-Alert-Signature": CANARY},
        ) as resp:
            assert resp.status == 401
            assert CANARY not in await resp.text()
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            job["_metrics"] = await resp.text()
    return job


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_no_secret_appears_in_any_output(tmp_path: Path, log_format: str) -> None:
    """A job and auth failures with canary secrets configured leave no canary in the output."""
    async with (
        SimulatorServer(credentials={ACCESS_KEY_ID: SAE_SECRET}) as sim,
        _serve(tmp_path, sim.endpoint, log_format) as (base, out),
    ):
        job = await _rollback_and_auth_failures(base, sim)
    assert job["status"] == "succeeded", job
    assert all(a["request_id"] for a in job["attempts"])
    text = out.read_text(errors="replace")
    assert "job_succeeded" in text  # the output really holds the job's log lines
    assert "sae_call" in text
    assert CANARY not in text
    assert CANARY not in job["_metrics"]


async def test_live_metrics_pass_promtool(tmp_path: Path) -> None:
    """/metrics of a service that ran real jobs is valid for `promtool check metrics`."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (Debian package 'prometheus'; .ci/run installs it)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    async with (
        SimulatorServer(credentials={ACCESS_KEY_ID: SAE_SECRET}) as sim,
        _serve(tmp_path, sim.endpoint, "json") as (base, _out),
    ):
        job = await _rollback_and_auth_failures(base, sim)
    metrics = job["_metrics"]
    assert 'sae_rollback_jobs_finished_total{status="succeeded"} 1.0' in metrics
    assert 'sae_rollback_api_calls_total{action="AbortAndRollbackChangeOrder",code="Success"}' in (
        metrics
    )
    assert 'sae_rollback_intake_requests_total{outcome="unauthorized",source=' in metrics
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # promtool exits non-zero on errors; lint warnings (none expected) go to stdout too.
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout

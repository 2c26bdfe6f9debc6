"""End to end with real processes: Alertmanager → sae-rollback serve → built-in simulator.

* A real Alertmanager (Debian ``prometheus-alertmanager``) with a webhook receiver that
  authenticates with a bearer token delivers an alert posted to its own v2 API; the
  rollback ends ``succeeded`` with its attempts; the same alert posted again (and the
  re-sends every ``repeat_interval``) make no second job.
* The newcomer's path of ``make run``: ``serve`` with ``config/local.toml``, then the
  printed next step (``submit --app-id demo-app``) and ``status`` through the CLI.

Without the Alertmanager binary the first test skips, unless ``CI`` is set: then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.intake.alertmanager import label_fingerprint

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "orchestrator"]
AM_TOKEN = "am-e2e-token-0123456789"
LOCAL_TOKEN = "local-dev-token"  # config/local.toml's public demo token
ALERTMANAGER = "prometheus-alertmanager"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
    }
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def _http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _wait_until(
    what: str, check: Any, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> Any:
    """Poll ``check()`` until it returns something truthy; fail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}")
        try:
            last = check()
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


@dataclass
class Proc:
    """A started subprocess with its log file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _start(args: list[str], log: Path, env: dict[str, str]) -> Proc:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return Proc(proc, log)


def _stop(started: Proc) -> int:
    """SIGTERM, then SIGKILL after 20 s; returns the exit code."""
    proc = started.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _alertmanager_binary() -> str:
    found = shutil.which(ALERTMANAGER) or (
        "/usr/bin/prometheus-alertmanager"
        if os.access("/usr/bin/prometheus-alertmanager", os.X_OK)
        else None
    )
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(
            f"{ALERTMANAGER} is not installed but CI is set: "
            "apt-get install -y prometheus-alertmanager",
            pytrace=False,
        )
    pytest.skip(f"{ALERTMANAGER} is not installed (apt-get install -y prometheus-alertmanager)")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[str]:
    """`sae-rollback serve` with the built-in simulator and an alertmanager source."""
    port = _free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}

[store]
url = "sqlite:///{tmp_path / "store.db"}"

[sae]
endpoint = "simulator"
protocol = "http"
calls_per_minute = 600

[retry]
initial_s = 0.2
max_interval_s = 1
max_elapsed_s = 60

[verify]
poll_interval_s = 0.3
timeout_s = 60

[sources.alertmanager]
kind = "alertmanager"
token = "{AM_TOKEN}"
allowed_apps = ["demo-app"]
"""
    )
    started = _start([*CLI, "serve", "--config", str(config)], tmp_path / "serve.log", _env())
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until("readyz", lambda: _http("GET", f"{base}/readyz")[0] == 200, 30, started.proc)
        yield base
    finally:
        code = _stop(started)
        print(started.tail())
    assert code == 0, f"serve exited with {code}"


@pytest.fixture
def alertmanager(tmp_path: Path, serve: str) -> Iterator[str]:
    """A real Alertmanager whose only receiver is serve's webhook, with bearer credentials."""
    binary = _alertmanager_binary()
    port = _free_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        f"""
route:
  receiver: sae-rollback
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 2s
receivers:
  - name: sae-rollback
    webhook_configs:
      - url: {serve}/v1/webhooks/alertmanager
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: {AM_TOKEN}
"""
    )
    started = _start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ],
        tmp_path / "alertmanager.log",
        _env(),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until(
            "alertmanager", lambda: _http("GET", f"{base}/-/ready")[0] == 200, 30, started.proc
        )
        yield base
    finally:
        _stop(started)
        print(started.tail())


def _jobs(serve: str) -> list[dict[str, Any]]:
    status, page = _http("GET", f"{serve}/v1/rollbacks?limit=100", token=AM_TOKEN)
    assert status == 200, page
    items: list[dict[str, Any]] = page["items"]
    return items


def _intake_count(serve: str, outcome: str) -> float:
    _, text = _http("GET", f"{serve}/metrics")
    needle = f'sae_rollback_intake_requests_total{{outcome="{outcome}",source="alertmanager"}} '
    for line in str(text).splitlines():
        if line.startswith(needle):
            return float(line[len(needle) :])
    return 0.0


@pytest.mark.slow
def test_alert_through_real_alertmanager_ends_as_one_succeeded_rollback(
    alertmanager: str, serve: str
) -> None:
    """An alert posted to Alertmanager is rolled back once, however often it is re-sent."""
    labels = {"alertname": "HighErrorRate", "sae_app_id": "demo-app", "severity": "critical"}
    alert = [
        {
            "labels": labels,
            "annotations": {"summary": "5xx above 5% after the deploy"},
            "startsAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
    ]
    status, _ = _http("POST", f"{alertmanager}/api/v2/alerts", alert)
    assert status == 200

    # Alertmanager identifies the alert exactly as the intake would compute it.
    _, known = _http("GET", f"{alertmanager}/api/v2/alerts")
    assert [a["fingerprint"] for a in known] == [label_fingerprint(labels)]

    jobs = _wait_until("a job", lambda: _jobs(serve), 30)
    [job] = jobs
    assert (job["app_id"], job["source"]) == ("demo-app", "alertmanager")
    assert "HighErrorRate" in job["reason"]

    def finished() -> dict[str, Any] | None:
        _, current = _http("GET", f"{serve}/v1/rollbacks/{job['id']}", token=AM_TOKEN)
        return current if current["status"] in ("succeeded", "failed", "skipped") else None

    done = _wait_until("the rollback to finish", finished, 60)
    assert done["status"] == "succeeded", done
    aborts = [a for a in done["attempts"] if a["action"] == "AbortAndRollbackChangeOrder"]
    assert [a["outcome"] for a in aborts] == ["success"]
    assert all(a["request_id"] and a["trace_id"] for a in done["attempts"])

    # The same alert again (and Alertmanager's own re-sends every repeat_interval).
    deduplicated_before = _intake_count(serve, "deduplicated")
    status, _ = _http("POST", f"{alertmanager}/api/v2/alerts", alert)
    assert status == 200
    _wait_until(
        "re-sent notifications",
        lambda: _intake_count(serve, "deduplicated") >= deduplicated_before + 2,
        30,
    )
    assert [j["id"] for j in _jobs(serve)] == [job["id"]]
    assert _intake_count(serve, "accepted") == 1


@pytest.mark.slow
def test_make_run_next_step_rolls_back_demo_app(tmp_path: Path) -> None:
    """serve on config/local.toml, then the printed submit/status steps, succeed as promised."""
    port = _free_port()
    env = _env(
        SAE_ROLLBACK_SERVER_PORT=str(port),
        SAE_ROLLBACK_STORE_URL=f"sqlite:///{tmp_path / 'var' / 'sae-rollback.db'}",
    )
    started = _start(
        [*CLI, "serve", "--config", str(REPO / "config" / "local.toml")],
        tmp_path / "serve.log",
        env,
    )
    server = f"http://127.0.0.1:{port}"
    try:
        _wait_until("readyz", lambda: _http("GET", f"{server}/readyz")[0] == 200, 30, started.proc)
        assert "submit --app-id demo-app" in started.log.read_text()
        client = ["--server", server, "--token", LOCAL_TOKEN]
        submitted = subprocess.run(
            [*CLI, "submit", "--app-id", "demo-app", "--reason", "bad deploy", *client, "--json"],
            capture_output=True,
            env=env,
            cwd=REPO,
            timeout=30,
            check=False,
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["id"]

        def finished() -> str | None:
            shown = subprocess.run(
                [*CLI, "status", job_id, *client],
                capture_output=True,
                env=env,
                cwd=REPO,
                timeout=30,
                check=False,
            )
            assert shown.returncode == 0, shown.stderr
            text = shown.stdout.decode()
            return text if "SUCCEEDED" in text or "FAILED" in text else None

        summary = _wait_until("the demo rollback", finished, 60, started.proc)
        assert f"job {job_id}  SUCCEEDED" in summary
        assert "AbortAndRollbackChangeOrder -> success" in summary
        assert "request_id=" in summary
    finally:
        code = _stop(started)
        print(started.tail())
    assert code == 0

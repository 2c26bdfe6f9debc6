"""The simulator as its own process (what `sae-rollback simulate` runs), driven by the SDK."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alibabacloud_sae20190506 import models as sae_models
from alibabacloud_sae20190506.client import Client
from alibabacloud_tea_openapi import utils_models as open_api_models

from tests.integration.conftest import TEST_ACCESS_KEY_ID, TEST_ACCESS_KEY_SECRET

REPO_ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS = {TEST_ACCESS_KEY_ID: TEST_ACCESS_KEY_SECRET}
SCRIPT = (
    "import asyncio\n"
    "from orchestrator.simulator import serve_forever\n"
    f"asyncio.run(serve_forever('127.0.0.1', 0, credentials={CREDENTIALS!r}, seed=11,\n"
    "                          calls_per_minute=None, demo=True))\n"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
async def simulator_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A `serve_forever` subprocess in demo mode and the endpoint from its ready line."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SCRIPT,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        endpoint = None
        async with asyncio.timeout(30):
            while endpoint is None:
                line = _ANSI.sub("", (await process.stdout.readline()).decode())
                assert line, "the simulator exited before it was ready"
                if "simulator_ready" in line:
                    match = re.search(r"endpoint=(127\.0\.0\.1:\d+)", line)
                    assert match is not None, line
                    endpoint = match.group(1)
        yield process, endpoint
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_simulator_subprocess_serves_the_sdk_and_stops_on_sigint(
    simulator_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    """serve_forever in its own process logs its endpoint, rolls back demo-app's running order
    for the SDK, and shuts down cleanly on SIGINT, releasing the port."""
    process, endpoint = simulator_process
    client = Client(
        open_api_models.Config(
            access_key_id=TEST_ACCESS_KEY_ID,
            access_key_secret=TEST_ACCESS_KEY_SECRET,
            endpoint=endpoint,
            protocol="http",
        )
    )
    status = await client.describe_application_status_async(
        sae_models.DescribeApplicationStatusRequest(app_id="demo-app")
    )
    order_id = status.body.data.last_change_order_id
    assert status.body.data.last_change_order_running is True
    aborted = await asyncio.to_thread(
        client.abort_and_rollback_change_order,
        sae_models.AbortAndRollbackChangeOrderRequest(change_order_id=order_id),
    )
    assert aborted.body.success is True
    assert aborted.body.data.change_order_id == order_id

    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(15):
        await process.wait()
    host, port = endpoint.split(":")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))

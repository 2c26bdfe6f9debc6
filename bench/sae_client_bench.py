"""SAE client benchmark: our ``SaeClient`` against the official SDK's async client.

Owns issue 2's client figures: calls per second and p50/p99 latency of

* ``ours``: :class:`orchestrator.sae.SaeClient` (one shared ``aiohttp`` session, keep-alive);
* ``sdk``: ``alibabacloud_sae20190506.client.Client(Config(...))``'s ``*_async`` methods
  (tea-openapi opens a new ``aiohttp.ClientSession``, hence a new TCP connection, per call;
  sae-api.md §3.2),

for two actions, each call signed with ACS3-HMAC-SHA256 and verified by the simulator:

* ``describe``: DescribeChangeOrder (idempotent; the same few running orders, over and over);
* ``abort``: AbortAndRollbackChangeOrder, every call on a fresh running change order created
  beforehand through ``POST /_sim/change-orders`` (one app per order: SAE runs one change order
  per app), so that every abort is accepted.

Load: ``C`` asyncio tasks in this process issue calls back to back until ``--calls`` calls are
done, at each concurrency of ``--concurrency``. Each cell (action × concurrency × client) gets
a fresh client and ``--warmup`` untimed calls first (connections, imports, caches). The
simulator runs in a **separate process** (``python -m orchestrator simulate --port 0 --no-demo
--seed 1``), so it shares neither this event loop nor this GIL, and is reached over loopback
TCP. ``--rounds R`` repeats everything, alternating which client goes first, and the tables
show the median of the rounds with the spread of calls/s.

Correctness is checked along the way: every answer must be a success naming the requested
change order, and after each cell the simulator's own call log (``GET /_sim/calls``) must show
exactly the timed calls, every one answered 200 to our access key (so every signature
verified), and for aborts every order accepted. Any failure is counted and reported, and the
run exits with status 1.

Also measured per cell: CPU milliseconds per call in this process (client cost) and in the
simulator process (server cost: a new connection per call is not free there either), and the
event-loop lag seen by a 5 ms ticker running beside the load (how long the loop was blocked).

Run: ``.venv/bin/python bench/sae_client_bench.py [--calls 2000] [--concurrency 1,50]
[--rounds 1] [--json out.json]``. Results and analysis live in ``bench/README.md``
("SAE client").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Protocol

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    # Run as a script, sys.path[0] is bench/; the repository root makes `bench.common` and
    # `orchestrator` import the same way as under pytest or `python -m bench.sae_client_bench`.
    sys.path.insert(0, str(_ROOT))

import aiohttp  # noqa: E402

from bench.common import (  # noqa: E402
    LatencySummary,
    format_table,
    git_revision,
    machine_info,
    percentile,
    timed,
    write_json,
)
from orchestrator.sae import SaeClient, StaticCredentials  # noqa: E402
from orchestrator.simulator import (  # noqa: E402
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_ACCESS_KEY_SECRET,
)

ACTIONS: Final = ("describe", "abort")
CLIENTS: Final = ("ours", "sdk")
SIM_ACTION_NAMES: Final = {
    "describe": "DescribeChangeOrder",
    "abort": "AbortAndRollbackChangeOrder",
}
REGION: Final = "cn-hangzhou"
SIM_SEED: Final = 1
#: Running change orders the ``describe`` cells read in turn.
DESCRIBE_ORDERS: Final = 16
SIM_READY_TIMEOUT_S: Final = 30.0
SIM_STOP_TIMEOUT_S: Final = 10.0
LAG_TICK_S: Final = 0.005
#: Per-call timeouts of both clients (the SDK's defaults, 5 s connect, 10 s read).
CONNECT_TIMEOUT_S: Final = 5.0
READ_TIMEOUT_S: Final = 10.0
#: Distinct failure messages kept per cell for the report.
MAX_FAILURE_SAMPLES: Final = 5
_PROXY_VARIABLES: Final = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the simulator


class SimulatorProcess:
    """``python -m orchestrator simulate`` in a child process on a free loopback port.

    The child logs one JSON ``simulator_ready`` line on stderr naming its endpoint; a thread
    keeps draining stderr afterwards (into a short ring kept for error reports) so that a full
    pipe can never stall the simulator mid-benchmark.
    """

    def __init__(self, *, seed: int = SIM_SEED) -> None:
        self.seed = seed
        self.endpoint = ""
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._tail: deque[str] = deque(maxlen=50)

    @property
    def pid(self) -> int:
        """The child's process id (after :meth:`start`)."""
        if self._proc is None:
            raise RuntimeError("the simulator process is not started")
        return self._proc.pid

    def start(self) -> None:
        """Spawn the simulator and wait until it listens."""
        argv = [
            sys.executable,
            "-m",
            "orchestrator",
            "--log-format",
            "json",
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-demo",
            "--seed",
            str(self.seed),
        ]
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
        self._proc = subprocess.Popen(
            argv,
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stderr is not None  # stderr=PIPE
        self._reader = threading.Thread(
            target=self._drain, args=(self._proc.stderr,), name="sim-stderr", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + SIM_READY_TIMEOUT_S
        while not self.endpoint:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise RuntimeError(f"the simulator did not start in time: {self._tail_text()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.stop()
                raise RuntimeError(f"the simulator exited at start: {self._tail_text()}")
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "simulator_ready":
                    self.endpoint = str(event["endpoint"])

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._tail.append(line.rstrip())
            if not self.endpoint:
                self._lines.put(line)
        self._lines.put(None)

    def _tail_text(self) -> str:
        return " | ".join(self._tail) or "(no output)"

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the child has used so far (Linux ``/proc``), else None."""
        if self._proc is None:
            return None
        return process_cpu_seconds(self._proc.pid)

    def stop(self) -> None:
        """SIGTERM (the CLI stops gracefully), SIGKILL if it lingers; reap the child."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=SIM_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=SIM_STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=SIM_STOP_TIMEOUT_S)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` from ``/proc/<pid>/stat``, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after its ')' are fixed.
    fields = raw.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


class SimControl:
    """The simulator's unsigned ``/_sim`` control API (orders and the call log)."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str) -> None:
        self._session = session
        self._base = f"http://{endpoint}/_sim"

    async def _send(self, method: str, path: str, body: Any = None) -> Any:
        async with self._session.request(method, self._base + path, json=body) as response:
            payload = await response.json()
            if response.status != 200:
                raise RuntimeError(
                    f"simulator control {method} {path}: {response.status} {payload}"
                )
            return payload

    async def healthz(self) -> None:
        """Fail unless the simulator answers."""
        await self._send("GET", "/healthz")

    async def create_orders(self, prefix: str, count: int, parallel: int = 16) -> list[str]:
        """``count`` running change orders, each on its own app ``<prefix>-<i>``; their ids."""
        ids: list[str | None] = [None] * count
        todo = iter(range(count))

        async def creator() -> None:
            for i in todo:
                created = await self._send("POST", "/change-orders", {"app_id": f"{prefix}-{i}"})
                ids[i] = str(created["change_order_id"])

        await asyncio.gather(*(creator() for _ in range(min(parallel, max(count, 1)))))
        return [i for i in ids if i is not None]

    async def clear_calls(self) -> None:
        """Forget the recorded calls."""
        await self._send("DELETE", "/calls")

    async def calls(self, action: str) -> tuple[list[dict[str, Any]], int]:
        """The recorded calls of one action, and the total recorded since the last clear."""
        payload = await self._send("GET", f"/calls?action={action}")
        return list(payload["calls"]), int(payload["total"])


# --------------------------------------------------------------------------- the two clients


class WrongAnswer(Exception):
    """A call "succeeded" but its answer is not what was asked for."""


class Caller(Protocol):
    """One client under test: both actions, raising on any failure or wrong answer."""

    name: str

    async def open(self) -> None:
        """Acquire the client's resources (no I/O in constructors)."""
        ...

    async def describe(self, change_order_id: str) -> None:
        """DescribeChangeOrder; the answer must name ``change_order_id``."""
        ...

    async def abort(self, change_order_id: str) -> None:
        """AbortAndRollbackChangeOrder; the answer must name ``change_order_id``."""
        ...

    async def aclose(self) -> None:
        """Release the client's resources."""
        ...


class OursCaller:
    """:class:`SaeClient` as the composition root builds it (no metrics hook: client cost)."""

    name = "ours"

    def __init__(self, endpoint: str, access_key_id: str, access_key_secret: str, c: int) -> None:
        self._client = SaeClient(
            region=REGION,
            credentials=StaticCredentials(access_key_id, access_key_secret),
            endpoint=endpoint,
            protocol="http",
            connect_timeout_s=CONNECT_TIMEOUT_S,
            read_timeout_s=READ_TIMEOUT_S,
            # At least one pooled connection per task, so no task waits for a connection.
            max_connections=max(100, c),
        )

    async def open(self) -> None:
        """Open the shared session."""
        await self._client.open()

    async def describe(self, change_order_id: str) -> None:
        """DescribeChangeOrder through ``SaeClient.describe_change_order``."""
        order = await self._client.describe_change_order(change_order_id)
        if order.change_order_id != change_order_id or order.outcome.http_status != 200:
            raise WrongAnswer(f"describe {change_order_id}: got {order.change_order_id}")

    async def abort(self, change_order_id: str) -> None:
        """AbortAndRollbackChangeOrder through ``SaeClient.abort_and_rollback``."""
        result = await self._client.abort_and_rollback(change_order_id)
        if result.change_order_id != change_order_id or result.outcome.http_status != 200:
            raise WrongAnswer(f"abort {change_order_id}: got {result.change_order_id}")

    async def aclose(self) -> None:
        """Close the session."""
        await self._client.close()


class SdkCaller:
    """The official SDK's async client pointed at the simulator (sae-api.md §5)."""

    name = "sdk"

    def __init__(self, endpoint: str, access_key_id: str, access_key_secret: str, c: int) -> None:
        # Imported here: the SDK is a test dependency, and `--clients ours` must not need it.
        from alibabacloud_sae20190506 import models as sae_models
        from alibabacloud_sae20190506.client import Client
        from alibabacloud_tea_openapi import utils_models as open_api_models

        self._models: Any = sae_models
        self._client: Any = Client(
            open_api_models.Config(
                access_key_id=access_key_id,
                access_key_secret=access_key_secret,
                endpoint=endpoint,
                protocol="http",
                region_id=REGION,
                connect_timeout=int(CONNECT_TIMEOUT_S * 1000),
                read_timeout=int(READ_TIMEOUT_S * 1000),
            )
        )

    async def open(self) -> None:
        """Nothing to open: the SDK makes a session per call."""

    async def describe(self, change_order_id: str) -> None:
        """DescribeChangeOrder through ``Client.describe_change_order_async``."""
        request = self._models.DescribeChangeOrderRequest(change_order_id=change_order_id)
        response = await self._client.describe_change_order_async(request)
        _check_sdk_answer("describe", change_order_id, response)

    async def abort(self, change_order_id: str) -> None:
        """AbortAndRollbackChangeOrder through ``abort_and_rollback_change_order_async``."""
        request = self._models.AbortAndRollbackChangeOrderRequest(change_order_id=change_order_id)
        response = await self._client.abort_and_rollback_change_order_async(request)
        _check_sdk_answer("abort", change_order_id, response)

    async def aclose(self) -> None:
        """Nothing to close: each call's session was closed by the SDK."""


def sdk_https_setup_ms(reps: int) -> list[float]:
    """Time, ``reps`` times, what the SDK's async path does per HTTPS call before connecting.

    ``darabonba.core.DaraCore.async_do_action`` builds a new SSL context and loads certifi's
    CA bundle for **every** HTTPS request, synchronously, on the event loop. The simulator
    speaks plain HTTP, so the cells above cannot show it; this replays the same two calls
    (milliseconds each). Our client's aiohttp session builds its SSL context once.
    """
    import ssl

    import certifi  # the SDK's own dependency, the bundle it loads

    bundle = certifi.where()
    timings: list[float] = []
    for _ in range(reps):
        start = time.perf_counter()
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.load_verify_locations(bundle)
        timings.append((time.perf_counter() - start) * 1000.0)
    return timings


def _check_sdk_answer(action: str, change_order_id: str, response: Any) -> None:
    # The SDK raises only on HTTP 4xx/5xx; a 200 with Success false comes back as a result.
    body = response.body
    data = getattr(body, "data", None)
    got = getattr(data, "change_order_id", None)
    if response.status_code != 200 or body.success is not True or got != change_order_id:
        raise WrongAnswer(
            f"{action} {change_order_id}: HTTP {response.status_code}, "
            f"Success={body.success!r}, ChangeOrderId={got!r}"
        )


CallerFactory = Callable[[str, str, str, int], Caller]
CALLER_FACTORIES: Final[Mapping[str, CallerFactory]] = {"ours": OursCaller, "sdk": SdkCaller}


# --------------------------------------------------------------------------- measurement


class LoopLagProbe:
    """A ticker beside the load: how late each ``LAG_TICK_S`` sleep wakes is the loop's lag.

    A client that blocks the event loop (synchronous work in a coroutine) shows up here as
    lag of about the blocking time; a purely async client keeps the lag near scheduling noise
    (which grows with the number of ready tasks per loop iteration).
    """

    def __init__(self, tick_s: float = LAG_TICK_S) -> None:
        self.tick_s = tick_s
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self.lags_s.append(max(0.0, time.perf_counter() - start - self.tick_s))

    def start(self) -> None:
        """Start ticking on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop ticking."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def p99_ms(self) -> float:
        """99th percentile lag in ms (0 without samples)."""
        return percentile(self.lags_s, 99) * 1000.0 if self.lags_s else 0.0

    def max_ms(self) -> float:
        """Largest lag in ms (0 without samples)."""
        return max(self.lags_s) * 1000.0 if self.lags_s else 0.0


_HEX_RUN: Final = re.compile(r"[0-9a-fA-F]{16,}")


def failure_key(exc: BaseException) -> str:
    """How a failure is counted: its type and first message line, ids and hashes blanked.

    Without the blanking, every SignatureDoesNotMatch (whose message carries the server's
    string-to-sign hash) would be a distinct failure and the report would list each one.
    """
    lines = str(exc).strip().splitlines()
    first = _HEX_RUN.sub("<hex>", lines[0] if lines else "")
    return f"{type(exc).__name__}: {first[:200]}"


@dataclass
class LoadResult:
    """What :func:`drive` measured."""

    latencies_s: list[float]
    failures: Counter[str]
    wall_s: float
    cpu_s: float


async def drive(call: Callable[[str], Any], targets: Sequence[str], concurrency: int) -> LoadResult:
    """Issue ``call(target)`` for every target from ``concurrency`` tasks, back to back.

    Latency is timed per successful call; a failure is counted by exception type and message
    (and the task carries on: every call must be attempted for the counts to mean anything).
    """
    todo: Iterator[str] = iter(targets)
    latencies: list[float] = []
    failures: Counter[str] = Counter()

    async def worker() -> None:
        # One shared iterator: asyncio tasks interleave only at awaits, so `next` is safe.
        for target in todo:
            start = time.perf_counter()
            try:
                await call(target)
            except Exception as exc:
                failures[failure_key(exc)] += 1
            else:
                latencies.append(time.perf_counter() - start)

    with timed() as m:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(latencies, failures, m.wall_s, m.cpu_s)


@dataclass
class CellResult:
    """One client × action × concurrency × round."""

    round: int
    action: str
    client: str
    concurrency: int
    calls: int
    ok: int
    failures: int
    warmup_failures: int
    wall_s: float
    calls_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    client_cpu_ms_per_call: float
    sim_cpu_ms_per_call: float | None
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    failure_samples: list[str] = field(default_factory=list)
    sim_log_problems: list[str] = field(default_factory=list)


async def check_sim_log(
    control: SimControl,
    action: str,
    targets: Sequence[str],
    access_key_id: str,
) -> list[str]:
    """Compare the simulator's call log with the calls just made; the problems found.

    The simulator only answers 200 after verifying the signature, so "every timed call is in
    the log, answered 200, to our key" is the signature check, seen from the server side.
    """
    sim_action = SIM_ACTION_NAMES[action]
    calls, total = await control.calls(sim_action)
    problems: list[str] = []
    if total != len(targets) or len(calls) != len(targets):
        problems.append(
            f"simulator recorded {total} call(s), {len(calls)} {sim_action}; "
            f"{len(targets)} were made"
        )
    bad = [c for c in calls if c.get("http_status") != 200 or c.get("code") != "200"]
    if bad:
        codes = Counter(f"{c.get('http_status')} {c.get('code')}" for c in bad)
        problems.append(f"{len(bad)} call(s) not answered 200: {dict(codes)}")
    # The key is recorded once the signature verified, so only answered calls are compared.
    foreign = sum(
        1 for c in calls if c.get("http_status") == 200 and c.get("access_key_id") != access_key_id
    )
    if foreign:
        problems.append(f"{foreign} call(s) not attributed to {access_key_id}")
    seen = Counter(str(c.get("change_order_id")) for c in calls)
    if seen != Counter(targets):
        problems.append("the change-order ids in the simulator's log differ from those called")
    if action == "abort":
        refused = sum(1 for c in calls if c.get("accepted") is not True)
        if refused:
            problems.append(f"{refused} abort(s) not accepted by the simulator")
    return problems


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs, from the command line."""

    endpoint: str
    access_key_id: str
    access_key_secret: str
    calls: int
    warmup: int
    concurrency: tuple[int, ...]
    rounds: int
    actions: tuple[str, ...]
    clients: tuple[str, ...]
    quiet: bool = False


async def run_cell(
    cfg: BenchConfig,
    control: SimControl,
    sim_cpu: Callable[[], float | None],
    *,
    round_no: int,
    action: str,
    client: str,
    concurrency: int,
    describe_ids: Sequence[str],
    prefix: str,
) -> CellResult:
    """Warm up, then time ``cfg.calls`` calls of one client/action/concurrency; check the log."""
    if action == "describe":
        cycle = itertools.cycle(describe_ids)
        warm = [next(cycle) for _ in range(cfg.warmup)]
        targets = [next(cycle) for _ in range(cfg.calls)]
    else:
        # Fresh running orders, created before the clock starts; every abort must be accepted.
        fresh = await control.create_orders(prefix, cfg.warmup + cfg.calls)
        warm, targets = fresh[: cfg.warmup], fresh[cfg.warmup :]

    caller = CALLER_FACTORIES[client](
        cfg.endpoint, cfg.access_key_id, cfg.access_key_secret, concurrency
    )
    await caller.open()
    probe = LoopLagProbe()
    try:
        call = caller.describe if action == "describe" else caller.abort
        warmed = await drive(call, warm, concurrency)
        await control.clear_calls()
        sim_cpu_before = sim_cpu()
        probe.start()
        load = await drive(call, targets, concurrency)
        await probe.stop()
        sim_cpu_after = sim_cpu()
    finally:
        await probe.stop()
        await caller.aclose()

    failures = load.failures + warmed.failures
    problems = await check_sim_log(control, action, targets, cfg.access_key_id)
    summary = LatencySummary.from_seconds(load.latencies_s) if load.latencies_s else None
    sim_cpu_ms = (
        (sim_cpu_after - sim_cpu_before) * 1000.0 / len(targets)
        if sim_cpu_before is not None and sim_cpu_after is not None
        else None
    )
    return CellResult(
        round=round_no,
        action=action,
        client=client,
        concurrency=concurrency,
        calls=len(targets),
        ok=len(load.latencies_s),
        failures=sum(load.failures.values()),
        warmup_failures=sum(warmed.failures.values()),
        wall_s=load.wall_s,
        calls_per_s=len(load.latencies_s) / load.wall_s if load.wall_s > 0 else 0.0,
        p50_ms=summary.median_ms if summary else None,
        p99_ms=summary.p99_ms if summary else None,
        mean_ms=summary.mean_ms if summary else None,
        max_ms=summary.max_ms if summary else None,
        client_cpu_ms_per_call=load.cpu_s * 1000.0 / len(targets),
        sim_cpu_ms_per_call=sim_cpu_ms,
        loop_lag_p99_ms=probe.p99_ms(),
        loop_lag_max_ms=probe.max_ms(),
        failure_samples=[
            f"{count}x {text}" for text, count in failures.most_common(MAX_FAILURE_SAMPLES)
        ],
        sim_log_problems=problems,
    )


async def run_bench(
    cfg: BenchConfig, sim_cpu: Callable[[], float | None] = lambda: None
) -> list[CellResult]:
    """Every round × action × concurrency × client against the simulator at ``cfg.endpoint``."""
    results: list[CellResult] = []
    async with aiohttp.ClientSession(
        # The control API is not what is measured; trust_env off keeps it on loopback.
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        control = SimControl(session, cfg.endpoint)
        await control.healthz()
        describe_ids: list[str] = []
        if "describe" in cfg.actions:
            describe_ids = await control.create_orders(
                f"bench-describe-{time.time_ns()}", DESCRIBE_ORDERS
            )
        for round_no in range(1, cfg.rounds + 1):
            # Alternate who goes first, so slow drift in machine load does not favour one side.
            clients = cfg.clients if round_no % 2 else tuple(reversed(cfg.clients))
            for action in cfg.actions:
                for concurrency in cfg.concurrency:
                    for client in clients:
                        cell = await run_cell(
                            cfg,
                            control,
                            sim_cpu,
                            round_no=round_no,
                            action=action,
                            client=client,
                            concurrency=concurrency,
                            describe_ids=describe_ids,
                            prefix=f"bench-{action}-{client}-c{concurrency}-r{round_no}"
                            f"-{time.time_ns()}",
                        )
                        results.append(cell)
                        _log(
                            cfg.quiet,
                            f"round {round_no} {action:8} {client:4} c={concurrency:<3} "
                            f"{cell.calls_per_s:8.0f} calls/s  p50 {_ms(cell.p50_ms)}  "
                            f"p99 {_ms(cell.p99_ms)}  failures {cell.failures}"
                            + (f"  LOG: {cell.sim_log_problems}" if cell.sim_log_problems else ""),
                        )
    return results


def failed_cell(cell: CellResult) -> bool:
    """Whether a cell saw any failed call (timed or warm-up) or a call-log disagreement."""
    return bool(cell.failures or cell.warmup_failures or cell.sim_log_problems)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


# --------------------------------------------------------------------------- report


@dataclass
class Summary:
    """The median over rounds of one client × action × concurrency."""

    action: str
    client: str
    concurrency: int
    rounds: int
    calls_per_s: float
    calls_per_s_min: float
    calls_per_s_max: float
    p50_ms: float | None
    p99_ms: float | None
    client_cpu_ms_per_call: float
    sim_cpu_ms_per_call: float | None
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    failures: int


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(results: Sequence[CellResult]) -> list[Summary]:
    """One :class:`Summary` per action × concurrency × client, in run order."""
    groups: dict[tuple[str, int, str], list[CellResult]] = {}
    for cell in results:
        groups.setdefault((cell.action, cell.concurrency, cell.client), []).append(cell)
    out: list[Summary] = []
    for (action, concurrency, client), cells in groups.items():
        rates = [c.calls_per_s for c in cells]
        out.append(
            Summary(
                action=action,
                client=client,
                concurrency=concurrency,
                rounds=len(cells),
                calls_per_s=statistics.median(rates),
                calls_per_s_min=min(rates),
                calls_per_s_max=max(rates),
                p50_ms=_median([c.p50_ms for c in cells]),
                p99_ms=_median([c.p99_ms for c in cells]),
                client_cpu_ms_per_call=statistics.median(c.client_cpu_ms_per_call for c in cells),
                sim_cpu_ms_per_call=_median([c.sim_cpu_ms_per_call for c in cells]),
                loop_lag_p99_ms=statistics.median(c.loop_lag_p99_ms for c in cells),
                loop_lag_max_ms=max(c.loop_lag_max_ms for c in cells),
                failures=sum(c.failures + c.warmup_failures for c in cells),
            )
        )
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def ratios(summaries: Sequence[Summary]) -> dict[str, dict[str, float | None]]:
    """``ours`` against ``sdk`` per action and concurrency (key ``"<action> c=<C>"``).

    ``throughput``: ours/sdk calls per second (> 1: ours is faster); ``p50``/``p99``:
    sdk/ours latency (> 1: ours answers sooner); ``client_cpu``: sdk/ours CPU per call.
    """
    by_key = {(s.action, s.concurrency, s.client): s for s in summaries}
    out: dict[str, dict[str, float | None]] = {}
    for (action, concurrency, client), ours in by_key.items():
        if client != "ours":
            continue
        sdk = by_key.get((action, concurrency, "sdk"))
        if sdk is None:
            continue
        out[f"{action} c={concurrency}"] = {
            "throughput": _ratio(ours.calls_per_s, sdk.calls_per_s),
            "p50": _ratio(sdk.p50_ms, ours.p50_ms),
            "p99": _ratio(sdk.p99_ms, ours.p99_ms),
            "client_cpu": _ratio(sdk.client_cpu_ms_per_call, ours.client_cpu_ms_per_call),
        }
    return out


def paired_throughput(results: Sequence[CellResult]) -> dict[str, dict[str, float]]:
    """ours/sdk calls/s compared within each round, then the median (and range) over rounds.

    The two cells of a round run back to back, so a burst of load from elsewhere on a shared
    machine tends to hit both or neither; the per-round ratio is steadier than the ratio of
    the two medians when the rounds themselves differ a lot.
    """
    cells = {(c.round, c.action, c.concurrency, c.client): c for c in results}
    per_key: dict[str, list[float]] = {}
    for (round_no, action, concurrency, client), ours in cells.items():
        sdk = cells.get((round_no, action, concurrency, "sdk"))
        if client != "ours" or sdk is None or sdk.calls_per_s <= 0:
            continue
        per_key.setdefault(f"{action} c={concurrency}", []).append(
            ours.calls_per_s / sdk.calls_per_s
        )
    return {
        key: {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        for key, vals in per_key.items()
    }


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _paired(value: Mapping[str, float] | None) -> str:
    if value is None:
        return "-"
    return f"{value['median']:.2f}x ({value['min']:.2f}-{value['max']:.2f})"


def render(results: Sequence[CellResult]) -> str:
    """The results table, the ratio table, and any failure, as text."""
    summaries = summarise(results)
    rounds = max((s.rounds for s in summaries), default=0)
    lines = [
        f"Median of {rounds} round(s); range = min-max calls/s over rounds; CPU = ms per call\n"
        "in the bench (client) and simulator processes; loop lag = lateness of a 5 ms ticker\n"
        "beside the load, p99 (median of rounds) / max (worst round).",
        format_table(
            [
                "action",
                "client",
                "conc",
                "calls/s",
                "range",
                "p50 ms",
                "p99 ms",
                "client CPU",
                "sim CPU",
                "loop lag ms",
                "failures",
            ],
            [
                [
                    s.action,
                    s.client,
                    s.concurrency,
                    f"{s.calls_per_s:,.0f}",
                    f"{s.calls_per_s_min:,.0f}-{s.calls_per_s_max:,.0f}",
                    _f(s.p50_ms),
                    _f(s.p99_ms),
                    _f(s.client_cpu_ms_per_call, ".3f"),
                    _f(s.sim_cpu_ms_per_call, ".3f"),
                    f"{s.loop_lag_p99_ms:.1f}/{s.loop_lag_max_ms:.0f}",
                    s.failures,
                ]
                for s in summaries
            ],
            align_right_from=2,
        ),
    ]
    cmp = ratios(summaries)
    paired = paired_throughput(results)
    if cmp:
        lines += [
            "",
            "Ours vs SDK (> 1 = ours better): throughput = ours/sdk of the median calls/s;\n"
            "paired = median (min-max) over rounds of ours/sdk within a round; "
            "p50, p99, client CPU = sdk/ours.",
            format_table(
                ["action, concurrency", "throughput", "paired", "p50", "p99", "client CPU"],
                [
                    [
                        key,
                        _x(v["throughput"]),
                        _paired(paired.get(key)),
                        _x(v["p50"]),
                        _x(v["p99"]),
                        _x(v["client_cpu"]),
                    ]
                    for key, v in cmp.items()
                ],
            ),
        ]
    broken = [c for c in results if failed_cell(c)]
    if broken:
        lines += ["", "FAILURES:"]
        for c in broken:
            where = f"round {c.round} {c.action} {c.client} c={c.concurrency}"
            lines += [f"  {where}: {s}" for s in c.failure_samples]
            lines += [f"  {where}: simulator log: {p}" for p in c.sim_log_problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected positive integers separated by commas") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def _csv_choice(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown value(s) {', '.join(unknown) or '(none)'}; choose from "
                f"{', '.join(choices)}"
            )
        return names

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of the benchmark."""
    p = argparse.ArgumentParser(
        description="SAE client benchmark: our SaeClient vs the official SDK's async client, "
        "against the simulator in another process.",
    )
    p.add_argument(
        "--calls", type=_positive, default=2000, help="timed calls per cell (default 2000)"
    )
    p.add_argument(
        "--concurrency",
        type=_csv_ints,
        default=(1, 50),
        help="comma-separated numbers of tasks issuing calls (default 1,50)",
    )
    p.add_argument(
        "--warmup", type=_non_negative, default=50, help="untimed calls per cell (default 50)"
    )
    p.add_argument(
        "--rounds", type=_positive, default=1, help="repeat every cell this often (default 1)"
    )
    p.add_argument(
        "--actions",
        type=_csv_choice(ACTIONS),
        default=ACTIONS,
        help=f"comma-separated actions (default {','.join(ACTIONS)})",
    )
    p.add_argument(
        "--clients",
        type=_csv_choice(CLIENTS),
        default=CLIENTS,
        help=f"comma-separated clients (default {','.join(CLIENTS)})",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--sim-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="use this already running simulator instead of starting one (no simulator CPU "
        "figures then; the bench creates orders in it and clears its call log per cell)",
    )
    p.add_argument(
        "--access-key-id", default=DEFAULT_ACCESS_KEY_ID, help="key the clients sign with"
    )
    p.add_argument(
        "--access-key-secret",
        default=DEFAULT_ACCESS_KEY_SECRET,
        help="secret the clients sign with (the simulator's default test secret)",
    )
    p.add_argument(
        "--tls-probe",
        type=_non_negative,
        default=10,
        metavar="REPS",
        help="time the SDK's per-call HTTPS context set-up this often (default 10; 0 = skip)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


@contextlib.contextmanager
def _no_proxy_env() -> Iterator[None]:
    """Unset proxy variables for the run: the SDK's HTTP layer would route loopback through one."""
    saved = {name: os.environ.pop(name) for name in _PROXY_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables; optionally write JSON. 1 if any call failed."""
    args = build_parser().parse_args(argv)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_no_proxy_env())
        sim_cpu: Callable[[], float | None] = lambda: None  # noqa: E731
        if args.sim_endpoint:
            endpoint = args.sim_endpoint
        else:
            sim = stack.enter_context(SimulatorProcess())
            endpoint, sim_cpu = sim.endpoint, sim.cpu_seconds
            _log(args.quiet, f"simulator pid {sim.pid} at {endpoint}")
        cfg = BenchConfig(
            endpoint=endpoint,
            access_key_id=args.access_key_id,
            access_key_secret=args.access_key_secret,
            calls=args.calls,
            warmup=args.warmup,
            concurrency=args.concurrency,
            rounds=args.rounds,
            actions=args.actions,
            clients=args.clients,
            quiet=args.quiet,
        )
        results = asyncio.run(run_bench(cfg, sim_cpu))
    tls_ms = sdk_https_setup_ms(args.tls_probe) if "sdk" in cfg.clients else []

    machine = machine_info()
    command = " ".join(["bench/sae_client_bench.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"SAE client benchmark: {cfg.calls} timed calls per cell (+{cfg.warmup} warm-up); "
        f"{machine['nproc']} CPUs; load {machine['load_avg_1m']}; {machine['date_utc']}"
    )
    print(render(results))
    if tls_ms:
        print(
            "\nNot in the figures above (the simulator speaks HTTP): over HTTPS the SDK also "
            "builds an SSL context\nand loads certifi's CA bundle on every call, blocking the "
            f"event loop: median {statistics.median(tls_ms):.1f} ms,\nmax {max(tls_ms):.1f} ms "
            f"per call here ({len(tls_ms)} reps; our client's session builds its context once)."
        )
    failed = any(failed_cell(c) for c in results)
    if args.json:
        summaries = summarise(results)
        write_json(
            args.json,
            {
                "meta": {
                    "command": command,
                    "machine": machine,
                    "git": git_revision(_ROOT),
                    "simulator": args.sim_endpoint or "child process (seed 1)",
                    "calls": cfg.calls,
                    "warmup": cfg.warmup,
                    "concurrency": list(cfg.concurrency),
                    "rounds": cfg.rounds,
                    "actions": list(cfg.actions),
                    "clients": list(cfg.clients),
                },
                "cells": [asdict(c) for c in results],
                "summary": [asdict(s) for s in summaries],
                "ratios": ratios(summaries),
                "paired_throughput": paired_throughput(results),
                "sdk_https_setup_ms": tls_ms,
                "failed": failed,
            },
        )
    if failed:
        print(
            "sae_client_bench: FAILED: some calls failed or the simulator's log disagrees "
            "(see FAILURES above); the figures are not valid.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

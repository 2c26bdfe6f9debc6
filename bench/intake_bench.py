"""Intake under an alert storm: Alertmanager deliveries at a fixed rate, mostly duplicates.

What it does, per engine (SQLite, PostgreSQL):

1. starts ``sae-rollback serve`` (intake + worker, built-in simulator) on a loopback port
   with one ``alertmanager`` source (its rate limit raised out of the way);
2. runs the load generator in a **separate process**: open loop at a fixed rate (request
   *i* is due at ``t0 + i/rate`` whether or not earlier ones were answered) over a fixed
   pool of keep-alive connections opened beforehand, with a minimal HTTP/1.1 client on
   asyncio protocols and Alertmanager v4 requests prepared up front as bytes (about half
   the CPU of aiohttp's client, so the generator is never the bottleneck). ``dup_ratio`` of the
   requests repeat an alert already sent (a re-send, or the other member of an HA pair);
   the rest are new alerts, each naming its own change order;
3. reports the achieved rate, latency from each request's *due* time to its answer (so a
   generator or server that falls behind shows up in the percentiles instead of hiding,
   "coordinated omission"), jobs created vs distinct alerts (must be equal: zero lost,
   zero duplicated), non-202 answers, the server's peak RSS and CPU, and the
   generator's own CPU share (it must stay well below one core to not be the bottleneck).

Run when the machine is quiet::

    .venv/bin/python bench/intake_bench.py                      # both engines, 1000/s, 30 s
    .venv/bin/python bench/intake_bench.py --engine sqlite --duration 10

PostgreSQL comes from ``--pg-dsn`` or ``SAE_ROLLBACK_BENCH_PG_DSN`` (then
``SAE_ROLLBACK_TEST_PG_DSN``, default ``postgresql://postgres@127.0.0.1:5432/test``); a
scratch database is created beside it and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    format_table,
    git_revision,
    machine_info,
    percentile,
    with_database,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-alertmanager-token-0123"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


# -- load generator (runs in its own process) ----------------------------------------------


def _bodies(distinct: int) -> list[bytes]:
    """One Alertmanager v4 delivery per distinct alert, each with its own change order."""
    bodies = []
    for k in range(distinct):
        labels = {
            "alertname": "BenchHighErrorRate",
            "sae_app_id": f"bench-app-{k}",
            "sae_change_order_id": f"bench-co-{k}",
            "severity": "critical",
        }
        group = {
            "version": "4",
            "groupKey": f'{{}}:{{alertname="BenchHighErrorRate",k="{k}"}}',
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "sae-rollback",
            "groupLabels": {"alertname": "BenchHighErrorRate"},
            "commonLabels": labels,
            "commonAnnotations": {"summary": "bench"},
            "externalURL": "http://alertmanager.invalid",
            "alerts": [
                {
                    "status": "firing",
                    "labels": labels,
                    "annotations": {"summary": "error rate above 5%"},
                    "startsAt": "2024-05-01T10:00:00.123456789Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus.invalid/graph",
                    "fingerprint": f"{k:016x}",
                }
            ],
        }
        bodies.append(json.dumps(group).encode())
    return bodies


def _schedule(total: int, dup_ratio: float, seed: int) -> tuple[list[int], int]:
    """Which alert each request carries: new ones in order, duplicates of earlier ones."""
    rng = random.Random(seed)
    distinct = max(1, round(total * (1 - dup_ratio)))
    # Spread the new alerts evenly over the run; everything else repeats a sent one.
    new_at = {round(i * total / distinct) for i in range(distinct)}
    order, sent = [], 0
    for i in range(total):
        if i in new_at or sent == 0:
            order.append(sent)
            sent += 1
        else:
            order.append(rng.randrange(sent))
    return order, sent


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, responses by length.

    The generator's whole HTTP client: aiohttp's client costs ~0.4 ms of CPU per request,
    which at 1,000/s is half a core on a 2-core machine that also runs the server. This
    costs a fraction of that (prepared request bytes, a header scan, no parsing beyond
    status and Content-Length — the intake always answers with a length).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            self.waiter.set_exception(ConnectionError("response without Content-Length"))
            return
        stop = head.find(b"\r\n", start + 2)
        length = int(head[start + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionError("connection closed by the server")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def _generate(
    url: str, rate: float, duration: float, dup_ratio: float, seed: int, connections: int
) -> dict:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    total = int(rate * duration)
    order, distinct = _schedule(total, dup_ratio, seed)
    requests = [
        (
            f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in _bodies(distinct)
    ]
    latencies: list[float] = [0.0] * total
    lags: list[float] = [0.0] * total
    statuses: dict[int, int] = {}
    jobs_by_alert: dict[int, set[str]] = {}
    accepted = 0
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    # A fixed pool, opened before the clock starts (as wrk does): the run measures the
    # service, not TCP handshakes piling up when the first requests queue. A request that
    # finds every connection busy waits for one, and that wait counts in its latency.
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        _, conn = await loop.create_connection(_Connection, host, port)
        idle.put_nowait(conn)

    async def one(i: int, due: float) -> None:
        nonlocal accepted
        k = order[i]
        conn = await idle.get()
        lags[i] = loop.time() - due
        try:
            status, payload = await conn.send(requests[k])
        except (ConnectionError, OSError) as exc:
            status, payload = 0, b""
            if len(errors) < 10:
                errors.append(repr(exc))
            _, conn = await loop.create_connection(_Connection, host, port)
        finally:
            idle.put_nowait(conn)
        latencies[i] = loop.time() - due
        statuses[status] = statuses.get(status, 0) + 1
        if status == 202:
            body = json.loads(payload)
            accepted += len(body["accepted"])
            ids = jobs_by_alert.setdefault(k, set())
            ids.update(body["accepted"], body["deduplicated"])

    tasks = set()
    cpu0 = time.process_time()
    t0 = loop.time() + 0.2
    for i in range(total):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    send_wall = loop.time() - t0
    while tasks:
        await asyncio.gather(*list(tasks))
    wall = loop.time() - t0
    cpu = time.process_time() - cpu0
    while not idle.empty():
        conn = idle.get_nowait()
        if conn.transport is not None:
            conn.transport.close()
    return {
        "requests": total,
        "distinct_alerts": distinct,
        "send_wall_s": send_wall,
        "wall_s": wall,
        "generator_cpu_s": cpu,
        "statuses": statuses,
        "accepted": accepted,
        "alerts_with_one_job": sum(1 for ids in jobs_by_alert.values() if len(ids) == 1),
        "alerts_with_several_jobs": sum(1 for ids in jobs_by_alert.values() if len(ids) > 1),
        "alerts_answered": len(jobs_by_alert),
        "distinct_job_ids": len({i for ids in jobs_by_alert.values() for i in ids}),
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p90": percentile(latencies, 90) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": max(latencies) * 1000,
        },
        # How late requests were written: generator starvation, or every connection busy.
        "send_lag_ms_p99": percentile(lags, 99) * 1000,
        # p99 per second of the run: shows whether the tail is spread out or one stall.
        "p99_ms_by_second": [
            round(percentile(latencies[i : i + int(rate)], 99) * 1000, 1)
            for i in range(0, total, max(1, int(rate)))
        ],
        "errors": errors,
    }


# -- orchestration --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def _get(url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except OSError:
        return 0, None


def _proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS MiB, CPU seconds) of a live process from /proc."""
    peak_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return peak_kb / 1024.0, cpu


def _count_jobs(base: str) -> int:
    total, cursor = 0, None
    for _ in range(10_000):
        query = "?limit=1000&source=alertmanager" + (f"&cursor={cursor}" if cursor else "")
        status, page = _get(f"{base}/v1/rollbacks{query}")
        if status != 200:
            raise RuntimeError(f"listing jobs failed: HTTP {status}")
        total += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return total


async def _pg_database(dsn: str, name: str, *, create: bool) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        if create:
            await conn.execute(f'CREATE DATABASE "{name}"')
        else:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def run_engine(engine: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One full run against ``serve`` on ``engine``."""
    port = _free_port()
    pg_name = None
    if engine == "sqlite":
        store_url = f"sqlite:///{workdir / f'{engine}.db'}"
    else:
        pg_name = f"intake_bench_{secrets.token_hex(4)}"
        asyncio.run(_pg_database(args.pg_dsn, pg_name, create=True))
        store_url = with_database(args.pg_dsn, pg_name)
    config = workdir / f"{engine}.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}

[store]
url = "{store_url}"

[sae]
endpoint = "simulator"
protocol = "http"

[sources.alertmanager]
kind = "alertmanager"
token = "{TOKEN}"
rate_per_s = 100000
burst = 100000
"""
    )
    cli = [sys.executable, "-m", "orchestrator"]
    try:
        if engine != "sqlite":
            subprocess.run(
                [*cli, "migrate", "--config", str(config)],
                check=True,
                cwd=REPO,
                env=_env(),
                capture_output=True,
            )
        log = (workdir / f"{engine}-serve.log").open("wb")
        serve = subprocess.Popen(
            [*cli, "--log-format", "json", args.command, "--config", str(config)],
            cwd=REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                if _get(f"{base}/readyz")[0] == 200:
                    break
                if serve.poll() is not None:
                    raise RuntimeError(f"serve exited with {serve.returncode}")
                time.sleep(0.1)
            else:
                raise RuntimeError("serve did not become ready")
            _, cpu_before = _proc_stats(serve.pid)
            out = workdir / f"{engine}-generator.json"
            generator = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--generate",
                f"{base}/v1/webhooks/alertmanager",
                "--rate",
                str(args.rate),
                "--duration",
                str(args.duration),
                "--dup-ratio",
                str(args.dup_ratio),
                "--connections",
                str(args.connections),
                "--out",
                str(out),
            ]
            subprocess.run(generator, check=True, cwd=REPO, env=_env())
            peak_rss_mb, cpu_after = _proc_stats(serve.pid)
            result = json.loads(out.read_text())
            result["jobs_in_store"] = _count_jobs(base)
            result["server_peak_rss_mb"] = peak_rss_mb
            result["server_cpu_share"] = (cpu_after - cpu_before) / result["wall_s"]
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
            log.close()
    finally:
        if pg_name is not None:
            asyncio.run(_pg_database(args.pg_dsn, pg_name, create=False))
    result["engine"] = engine
    return result


def _report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = []
    for r in results:
        lat = r["latency_ms"]
        non_202 = sum(n for status, n in r["statuses"].items() if str(status) != "202")
        rows.append(
            [
                r["engine"],
                f"{r['requests'] / r['wall_s']:,.0f}",
                f"{lat['p50']:.1f}",
                f"{lat['p99']:.1f}",
                f"{lat['max']:.0f}",
                r["distinct_alerts"],
                r["jobs_in_store"],
                r["alerts_with_several_jobs"],
                non_202,
                f"{r['server_peak_rss_mb']:.0f}",
                f"{r['server_cpu_share'] * 100:.0f}%",
                f"{r['generator_cpu_s'] / r['wall_s'] * 100:.0f}%",
            ]
        )
    table = format_table(
        [
            "engine",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "distinct alerts",
            "jobs",
            "dup jobs",
            "non-202",
            "server peak RSS MiB",
            "server CPU",
            "generator CPU",
        ],
        rows,
    )
    return f"rate {args.rate:g}/s for {args.duration:g} s, {args.dup_ratio:.0%} duplicates\n{table}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--command",
        choices=["serve", "api"],
        default="serve",
        help="serve: intake + worker (the benchmark); api: intake alone (to compare)",
    )
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--dup-ratio", type=float, default=0.9)
    parser.add_argument(
        "--connections", type=int, default=64, help="keep-alive connections of the generator"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get(
            "SAE_ROLLBACK_BENCH_PG_DSN", os.environ.get("SAE_ROLLBACK_TEST_PG_DSN", DEFAULT_DSN)
        ),
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep configs and server logs here"
    )
    parser.add_argument("--generate", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.generate:  # the load-generator process
        result = asyncio.run(
            _generate(
                args.generate,
                args.rate,
                args.duration,
                args.dup_ratio,
                args.seed,
                args.connections,
            )
        )
        args.out.write_text(json.dumps(result))
        return 0

    engines = ["sqlite", "postgres"] if args.engine == "both" else [args.engine]
    results = []
    if args.workdir is not None:  # keep configs, server logs and raw results
        args.workdir.mkdir(parents=True, exist_ok=True)
        for engine in engines:
            results.append(run_engine(engine, args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="intake-bench-") as tmp:
            for engine in engines:
                results.append(run_engine(engine, args, Path(tmp)))
    print(_report(results, args))
    for r in results:
        print(
            f"{r['engine']}: statuses {r['statuses']}, generator send lag p99 "
            f"{r['send_lag_ms_p99']:.1f} ms, errors {r['errors'][:3]}"
        )
    if args.json is not None:
        write_json(
            args.json,
            {"machine": machine_info(), "revision": git_revision(REPO), "results": results},
        )
    ok = all(
        r["jobs_in_store"] == r["distinct_alerts"] and r["alerts_with_several_jobs"] == 0
        for r in results
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

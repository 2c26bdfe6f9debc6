"""Small helpers shared by the benchmarks: timing, percentiles, CPU/RSS sampling, tables, DSNs.

Nothing here knows about a particular engine or benchmark; each ``bench/*_bench.py`` script
imports what it needs. Run a benchmark as a script (``.venv/bin/python bench/<name>.py``) or
as a module (``.venv/bin/python -m bench.<name>``); both put the repository root on
``sys.path`` so that ``bench.common`` and ``orchestrator`` import the same way.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the ``pct`` percentile (0-100) of ``values`` by linear interpolation.

    Linear interpolation between closest ranks (numpy's default) so that p50 of an even
    sample is the usual median and p99 of 50 samples leans on the two largest values
    instead of jumping to the maximum.
    """
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Distribution of a latency sample, in milliseconds."""

    n: int
    median_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> LatencySummary:
        """Summarise ``samples`` given in seconds."""
        ms = [s * 1000.0 for s in samples]
        return cls(
            n=len(ms),
            median_ms=percentile(ms, 50),
            p99_ms=percentile(ms, 99),
            mean_ms=statistics.fmean(ms),
            min_ms=min(ms),
            max_ms=max(ms),
        )


@dataclass
class Measurement:
    """Wall and CPU time of one timed block (filled in when the block exits)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def cpu_share(self) -> float:
        """CPU seconds of this process per wall second (1.0 = one core busy all along)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def rate(self, count: int) -> float:
        """``count`` events per wall second."""
        return count / self.wall_s if self.wall_s > 0 else math.inf


@contextmanager
def timed() -> Iterator[Measurement]:
    """Measure the wall time (monotonic) and this process's CPU time of a ``with`` block.

    The CPU share tells whether a phase is bound by this Python process or is waiting on
    something else (database server, fsync) — the first question when a figure disappoints.
    """
    result = Measurement()
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    try:
        yield result
    finally:
        result.wall_s = time.perf_counter() - wall0
        result.cpu_s = time.process_time() - cpu0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def with_database(dsn: str, database: str) -> str:
    """Return ``dsn`` (a ``postgresql://`` URL) pointing at ``database`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def machine_info() -> dict[str, Any]:
    """Describe where a benchmark ran: CPUs, memory, kernel, Python, date (UTC)."""
    mem_total_mb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_mb = int(line.split()[1]) / 1024.0
                break
    except OSError:
        pass
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_mb": round(mem_total_mb),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def git_revision(cwd: Path) -> str:
    """Short git revision of ``cwd``: ``"uncommitted"`` before the first commit, ``""`` w/o git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else "uncommitted"


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, align_right_from: int = 1
) -> str:
    """Render a plain-text table (monospace, ``|``-separated, Markdown compatible).

    Columns from ``align_right_from`` on are right-aligned (numbers); floats are printed
    as given, so callers format them (e.g. ``f"{x:,.0f}"``) before passing them in.
    """
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if i >= align_right_from else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(
        "-" * (w + 1) + ":" if i >= align_right_from else "-" * (w + 2)
        for i, w in enumerate(widths)
    )
    sep += "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.1f}"
    return str(value)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON (dataclasses converted), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

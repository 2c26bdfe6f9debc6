"""Keeps bench/worker_bench.py from rotting: tiny throughput and reaction runs on SQLite.

The real runs (2,000 jobs, both engines, the busy-wait scenarios) are made by hand; see
bench/README.md ("Worker"). These only prove the harness still drives the current worker
end to end and reports what it claims to measure.
"""

from __future__ import annotations

import pytest

from bench import worker_bench


async def test_throughput_run_finishes_every_job_and_reports_rates() -> None:
    """20 jobs through a simulator process: all succeed, two calls each, rates reported."""
    row = await worker_bench.bench_throughput(
        "sqlite", worker_bench.DEFAULT_PG_DSN, jobs=20, latency_ms=5, concurrency=4
    )
    assert row["statuses"] == {"succeeded": 20}
    assert row["calls"] == 40
    assert row["jobs_per_s"] > 0
    assert row["calls_per_s"] == pytest.approx(2 * row["jobs_per_s"], rel=0.01)
    assert row["bound_calls_per_s"] == 800
    assert (
        "throughput"
        in worker_bench.report(
            {"throughput": [row], "args": {"latency_ms": 5, "concurrency": 4}}
        ).lower()
    )


async def test_reaction_run_samples_each_job() -> None:
    """Three idle-worker samples on SQLite, each a positive commit-to-call time."""
    row = await worker_bench.bench_reaction("sqlite", worker_bench.DEFAULT_PG_DSN, samples=3)
    summary = row["from_commit"]
    assert summary["n"] == 3
    assert 0 < summary["median_ms"] < 1000


async def test_throughput_never_has_more_calls_on_the_wire_than_call_slots() -> None:
    """Little's law on the recorded call times stays within ``concurrency``."""
    row = await worker_bench.bench_throughput(
        "sqlite", worker_bench.DEFAULT_PG_DSN, jobs=20, latency_ms=5, concurrency=4
    )
    assert 0 < row["calls_in_flight_mean"] <= 4.0 + 1e-6


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (list(range(1, 101)), (41, 61)),
        ([1, 2, 3], (1, 3)),
    ],
)
def test_median_confidence_interval_brackets_the_median(
    values: list[int], expected: tuple[int, int]
) -> None:
    """Order statistics n/2 -+ 1.96 sqrt(n)/2, clamped to the sample."""
    assert worker_bench._median_ci95([float(v) for v in values]) == expected

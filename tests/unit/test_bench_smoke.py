"""Keeps bench/store_bench.py from rotting: a tiny run against SQLite, plus its helpers.

The real benchmark (5,000 jobs, four engines, PostgreSQL) is run by hand; see
bench/README.md. These tests only prove that the harness still drives the current
store API end to end, counts what it claims to count, and reports it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from bench import common, store_bench


@pytest.mark.parametrize(
    ("finish", "writes"),
    [
        ("one-write", {"claim", "transition"}),
        ("two-writes", {"claim", "record_attempt", "transition"}),
    ],
)
async def test_sqlite_run_measures_every_phase_and_finishes_every_job(
    finish: str, writes: set[str]
) -> None:
    """A tiny SQLite run enqueues, drains at two concurrencies and samples pickup latency."""
    engine = store_bench.OurStoreEngine(
        "sqlite", store_bench.DEFAULT_PG_DSN, claim_batch=4, finish=finish
    )
    result = await store_bench.run_engine(
        engine, jobs=24, concurrencies=(1, 6), pickup_samples=3, pickup_gap_s=0.01
    )

    assert result.engine == "sqlite"
    assert result.enqueue.jobs == 24
    assert result.enqueue.per_s > 0
    assert set(result.drain) == {"1", "6"}
    assert all(phase.jobs == 24 and phase.per_s > 0 for phase in result.drain.values())
    assert result.pickup.n == 3
    # Pickup is timed from the enqueue's commit to the claim: never longer than from the call.
    assert 0 < result.pickup.median_ms <= result.pickup_from_call.median_ms
    assert result.peak_rss_mb > 0
    # the store calls made per job are the ones the finish mode names, and only those
    assert set(result.details["op_mean_ms_c1"]) == writes
    # teardown removed the temporary database directory
    assert not Path(result.details["url"].removeprefix("sqlite:///")).parent.exists()


def test_cli_runs_sqlite_in_a_child_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--only sqlite --json`` prints the table and writes results, goals and machine data."""
    out = tmp_path / "bench.json"
    code = store_bench.main(
        [
            "--only",
            "sqlite",
            "--jobs",
            "12",
            "--concurrency",
            "1,3",
            "--pickup-samples",
            "2",
            "--pickup-gap",
            "0.01",
            "--analyze",
            "--repeat",
            "2",
            "--json",
            str(out),
            "--quiet",
        ]
    )

    assert code == 0
    printed = capsys.readouterr().out
    assert "| sqlite " in printed
    assert "claim+finish/s c=3" in printed
    data = json.loads(out.read_text())
    assert [r["engine"] for r in data["results"]] == ["sqlite"]
    assert data["results"][0]["drain"]["3"]["jobs"] == 12
    assert data["meta"]["machine"]["nproc"] >= 1
    assert data["meta"]["analyze"] is True
    assert len(data["results"][0]["details"]["runs"]) == 2
    assert len(data["results"][0]["pickup_ms"]) == 4  # two samples from each run, pooled
    assert "Every run's rates" in printed
    goal = "sqlite claim+finish >= 2,000/s (c=3)"
    assert data["comparison"]["goals"][goal] == (
        data["results"][0]["drain"]["3"]["per_s"] >= store_bench.SQLITE_GOAL_PER_S
    )


def test_cli_rejects_an_unknown_engine(capsys: pytest.CaptureFixture[str]) -> None:
    """``--only`` with a name that is not an engine is a usage error, not a silent skip."""
    with pytest.raises(SystemExit) as exc:
        store_bench.main(["--only", "sqlite,redis"])

    assert exc.value.code == 2
    assert "redis" in capsys.readouterr().err


def test_percentile_interpolates_between_ranks() -> None:
    """``percentile`` agrees with the inclusive method of ``statistics.quantiles``."""
    values = [7.0, 1.0, 3.0, 10.0, 2.0, 8.0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")

    assert common.percentile(values, 50) == pytest.approx(statistics.median(values))
    assert common.percentile(values, 99) == pytest.approx(cuts[98])
    assert common.percentile(values, 0) == 1.0
    assert common.percentile(values, 100) == 10.0
    with pytest.raises(ValueError, match="empty"):
        common.percentile([], 50)


def _result(engine: str, rate: float, pickup_ms: float) -> store_bench.EngineResult:
    phase = store_bench.Phase(jobs=10, wall_s=10 / rate, per_s=rate, cpu_share=0.5)
    latency = common.LatencySummary(1, pickup_ms, pickup_ms, pickup_ms, pickup_ms, pickup_ms)
    return store_bench.EngineResult(
        engine=engine,
        jobs=10,
        enqueue=phase,
        drain={"1": phase, "50": phase},
        pickup=latency,
        pickup_from_call=latency,
        peak_rss_mb=rate / 100,
        setup_s=0.0,
        pickup_ms=[pickup_ms],
        pickup_from_call_ms=[pickup_ms + 1.0],
    )


def test_compare_reports_ratios_and_goals_against_the_peers() -> None:
    """Ratios are ours / peer per metric, and each goal of the brief is judged from them."""
    result = _result
    cmp = store_bench.compare(
        [result("postgres", 3000.0, 2.0), result("pgqueuer", 4000.0, 4.0)], [1, 50]
    )

    ratios = cmp["ratios"]["postgres/pgqueuer"]
    assert ratios["claim+finish c=50"] == pytest.approx(0.75)
    assert ratios["pickup p50 (lower is better)"] == pytest.approx(0.5)
    assert cmp["goals"]["postgres throughput >= pgqueuer (c=50)"] is False
    assert cmp["goals"]["postgres pickup p50 <= pgqueuer"] is True


def test_repeated_runs_combine_into_medians_and_pooled_pickup_samples() -> None:
    """Three runs give the median rate, the highest peak RSS and pickup over all samples."""
    runs = [
        _result("sqlite", 900.0, 3.0),
        _result("sqlite", 1500.0, 1.0),
        _result("sqlite", 1200.0, 2.0),
    ]

    combined = store_bench.combine_runs(runs)

    assert combined.drain["50"].per_s == 1200.0
    assert combined.enqueue.per_s == 1200.0
    assert combined.peak_rss_mb == 15.0
    assert sorted(combined.pickup_ms) == [1.0, 2.0, 3.0]
    assert combined.pickup.median_ms == pytest.approx(2.0)
    assert combined.pickup_from_call.median_ms == pytest.approx(3.0)
    assert [run["c=50"] for run in combined.details["runs"]] == [900.0, 1500.0, 1200.0]
    assert store_bench.combine_runs(runs[:1]) is runs[0]

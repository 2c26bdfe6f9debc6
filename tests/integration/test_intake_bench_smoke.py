"""The intake benchmark still runs end to end (tiny rate and duration, SQLite only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import intake_bench


@pytest.mark.slow
def test_intake_bench_counts_one_job_per_distinct_alert(tmp_path: Path) -> None:
    """A short storm against serve creates exactly one job per distinct alert."""
    out = tmp_path / "results.json"
    code = intake_bench.main(
        ["--engine", "sqlite", "--rate", "100", "--duration", "1", "--json", str(out)]
    )
    assert code == 0
    [result] = json.loads(out.read_text())["results"]
    assert result["jobs_in_store"] == result["distinct_alerts"] == 10
    assert result["statuses"] == {"202": 100}
    assert result["alerts_with_several_jobs"] == 0

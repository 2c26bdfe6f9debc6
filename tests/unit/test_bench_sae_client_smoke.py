"""Keeps ``bench/sae_client_bench.py`` from rotting: tiny runs against a real simulator process.

The benchmark starts the simulator as a child process and drives both clients over loopback,
so these runs exercise the whole pipeline (spawn, control API, both clients, the simulator's
call-log cross-check, the report and the JSON) in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import sae_client_bench as bench


def _cell(client: str, rate: float, p50: float, p99: float, round_no: int = 1) -> Any:
    return bench.CellResult(
        round=round_no,
        action="describe",
        client=client,
        concurrency=50,
        calls=100,
        ok=100,
        failures=0,
        warmup_failures=0,
        wall_s=100 / rate,
        calls_per_s=rate,
        p50_ms=p50,
        p99_ms=p99,
        mean_ms=p50,
        max_ms=p99,
        client_cpu_ms_per_call=0.5 if client == "ours" else 1.0,
        sim_cpu_ms_per_call=None,
        loop_lag_p99_ms=0.0,
        loop_lag_max_ms=0.0,
    )


def test_tiny_run_measures_both_clients_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both clients, both actions, two concurrencies: every call succeeds and is accounted for."""
    out = tmp_path / "client.json"
    code = bench.main(
        [
            "--calls", "20", "--warmup", "2", "--concurrency", "1,4", "--tls-probe", "1",
            "--json", str(out), "-q",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert report["failed"] is False
    cells = report["cells"]
    assert {(c["action"], c["client"], c["concurrency"]) for c in cells} == {
        (action, client, conc)
        for action in ("describe", "abort")
        for client in ("ours", "sdk")
        for conc in (1, 4)
    }
    for cell in cells:
        assert cell["calls"] == cell["ok"] == 20
        assert cell["failures"] == cell["warmup_failures"] == 0
        assert cell["sim_log_problems"] == []
        assert cell["calls_per_s"] > 0
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
        # The simulator is a child process, so its CPU is measured.
        assert cell["sim_cpu_ms_per_call"] is not None
    keys = {"describe c=1", "describe c=4", "abort c=1", "abort c=4"}
    assert set(report["ratios"]) == set(report["paired_throughput"]) == keys
    assert all(r["throughput"] > 0 for r in report["ratios"].values())
    [tls_ms] = report["sdk_https_setup_ms"]
    assert tls_ms > 0
    assert "Ours vs SDK" in printed
    assert "FAILURES" not in printed


def test_rejected_signatures_fail_the_run_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Signing with the wrong secret makes every call fail, and the run exits 1 saying so."""
    out = tmp_path / "client.json"
    code = bench.main(
        [
            "--calls", "5", "--warmup", "0", "--concurrency", "2", "--actions", "abort",
            "--access-key-secret", "not-the-secret", "--tls-probe", "0", "--json", str(out), "-q",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED" in captured.err
    assert "SignatureDoesNotMatch" in captured.out
    report = json.loads(out.read_text())
    assert report["failed"] is True
    for cell in report["cells"]:
        assert cell["ok"] == 0
        assert cell["failures"] == 5
        assert any("SignatureDoesNotMatch" in p for p in cell["sim_log_problems"])


def test_ratios_compare_medians_of_rounds() -> None:
    """Throughput is ours/sdk and latency sdk/ours, each side the median of its rounds."""
    cells = [
        _cell("ours", 3000.0, 10.0, 30.0, round_no=1),
        _cell("ours", 1000.0, 20.0, 50.0, round_no=2),
        _cell("sdk", 500.0, 60.0, 200.0, round_no=1),
        _cell("sdk", 1500.0, 40.0, 100.0, round_no=2),
    ]
    [ours, sdk] = bench.summarise(cells)
    assert (ours.calls_per_s, ours.calls_per_s_min, ours.calls_per_s_max) == (2000.0, 1000, 3000)
    assert sdk.p50_ms == 50.0
    ratio = bench.ratios([ours, sdk])["describe c=50"]
    assert ratio["throughput"] == pytest.approx(2.0)
    assert ratio["p50"] == pytest.approx(50.0 / 15.0)
    assert ratio["p99"] == pytest.approx(150.0 / 40.0)
    assert ratio["client_cpu"] == pytest.approx(2.0)


def test_paired_throughput_compares_within_each_round() -> None:
    """The paired ratio divides ours by the SDK of the same round, then takes the median."""
    cells = [
        _cell("ours", 3000.0, 10.0, 30.0, round_no=1),
        _cell("sdk", 1000.0, 60.0, 200.0, round_no=1),
        _cell("ours", 1000.0, 20.0, 50.0, round_no=2),
        _cell("sdk", 500.0, 40.0, 100.0, round_no=2),
        _cell("ours", 800.0, 20.0, 50.0, round_no=3),
        _cell("sdk", 200.0, 40.0, 100.0, round_no=3),
    ]
    paired = bench.paired_throughput(cells)["describe c=50"]
    assert paired == {"median": 3.0, "min": 2.0, "max": 4.0}


class _FakeControl:
    def __init__(self, calls: list[dict[str, Any]]) -> None:
        self._calls = calls

    async def calls(self, action: str) -> tuple[list[dict[str, Any]], int]:
        return self._calls, len(self._calls)


async def test_call_log_check_catches_a_missing_or_unaccepted_call() -> None:
    """A call the simulator never saw, or an abort it did not accept, is a reported problem."""
    good = {"http_status": 200, "code": "200", "access_key_id": "AK", "accepted": True}
    log = [{**good, "change_order_id": "a"}, {**good, "change_order_id": "b", "accepted": False}]
    problems = await bench.check_sim_log(
        _FakeControl(log),  # type: ignore[arg-type]
        "abort",
        ["a", "b", "c"],
        "AK",
    )
    assert any("3 were made" in p for p in problems)
    assert any("ids in the simulator's log differ" in p for p in problems)
    assert any("1 abort(s) not accepted" in p for p in problems)
    assert await bench.check_sim_log(_FakeControl(log[:1]), "abort", ["a"], "AK") == []  # type: ignore[arg-type]

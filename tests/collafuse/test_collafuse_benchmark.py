"""benchmarks/collafuse.py on a tiny configuration: the same code as the recorded run, in under a minute.

The benchmark and the samples script run as ``__main__`` in this process (in_process.script: the same argv, the same
code; each new Python process costs seconds of imports); the benchmark's clients are still processes of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import in_process

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_trains_each_cut_ratio_and_measures_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = [
        "--cut-ratios", "0,1", "--clients", "2", "--rounds", "2", "--images", "8", "--batch", "4",
        "--eval-images", "8", "--steps", "4", "--feature-steps", "20", "--out", str(out),
        "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"),
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    # For the clients' processes, from tmp_path (OMP_WAIT_POLICY=PASSIVE, which the script sets for them, conftest.py
    # has set for this whole process).
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    in_process.script(monkeypatch, ROOT / "benchmarks" / "collafuse.py", *args)
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    alone, server = results
    assert (alone["cut_ratio"], alone["handoff"], server["cut_ratio"], server["handoff"]) == (0.0, 1000, 1.0, 0)
    assert alone["server_rows"] == 0 and server["server_rows"] == 2 * 2 * 4 - sum(
        c["rows_local"] for c in server["clients"]
    )
    assert server["bytes_up_per_round"] > 10 * alone["bytes_up_per_round"]
    for result in results:
        assert not result["dropped"] and len(result["per_client"]) == 2
        for client in result["per_client"]:
            assert client["kid"] == client["kid"] and client["kid_std"] >= 0 and client["disclosure_mse"] > 0  # not NaN
            assert 0 <= client["adherence"] <= 1
    for client in server["per_client"]:  # c = 1: the server ran every step, and read its training rows back
        assert client["client_cpu_seconds_per_image"] == 0 and client["server_cpu_seconds_per_image"] > 0
        assert client["inverted_rows"] > 0 and client["inverted_mse"] < 0.01
    assert all(c["inverted_rows"] == 0 for c in alone["per_client"])
    assert "| 0 | 1000 |" in (tmp_path / "r.md").read_text() and (tmp_path / "r.png").stat().st_size > 0

    # The samples figure reads the same run's saved U-Nets.
    in_process.script(
        monkeypatch, ROOT / "scripts" / "collafuse_samples.py", "--run", str(out), "--png", str(tmp_path / "s.png"),
        "--clients", "2", "--per-client", "2", "--steps", "4",
    )  # fmt: skip
    assert (tmp_path / "s.png").stat().st_size > 0

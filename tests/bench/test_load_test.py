"""benchmarks/load_test.py end to end on a tiny model (random weights from benchmarks/random_checkpoint.py):
concurrent devices, every output checked against its single-client run, figures written as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

import in_process

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_random_checkpoint_then_load_test_with_a_pinned_server(tiny_checkpoint, tmp_path: Path, monkeypatch) -> None:
    src, ref = tiny_checkpoint("llama")
    out = tmp_path / "random"
    # As __main__ in this process: a process of its own would spend its time importing torch and transformers.
    in_process.script(monkeypatch, ROOT / "benchmarks" / "random_checkpoint.py", str(src), str(out), "--seed", "3")
    weights = load_file(out / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape == ref.model.embed_tokens.weight.shape
    assert not embed.equal(ref.model.embed_tokens.weight)  # same shapes, new weights
    assert (out / "tokenizer.json").exists()

    report = tmp_path / "load.json"
    text = run(
        "load_test.py", "--model", str(out), "--layers", "1:4", "--server-device", "cpu", "--server-cpus", "0",
        "--clients", "1", "--clients", "3", "--new-tokens", "6", "--json", str(report),
    )  # fmt: skip
    assert "(server on 0)" in text
    rows = json.loads(report.read_text())["rows"]
    seen = [(r["clients"], r["tokens"], r["errors"], r["correct"]) for r in rows]
    assert seen == [(1, 6, 0, "1/1"), (3, 18, 0, "3/3")]
    assert all(r["aggregate_tok_s"] > 0 for r in rows)

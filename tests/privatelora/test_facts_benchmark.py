"""benchmarks/privatelora_facts.py on a tiny model: the same code as the recorded SmolLM2 run, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lambdasplit.privatelora import PrivateAdapters

ROOT = Path(__file__).resolve().parents[2]


def test_the_facts_benchmark_trains_both_methods_and_scores_recall(tiny_checkpoint, tmp_path) -> None:
    path, _ = tiny_checkpoint("llama")
    out, saved = tmp_path / "facts.json", tmp_path / "m.safetensors"
    args = [
        "--model", str(path), "--people", "2", "--relations", "2", "--epochs", "6", "--seq-len", "16",
        "--rank", "4", "--timing-steps", "2", "--save", str(saved), "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "privatelora_facts.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["facts"] == 4 and result["blocks"] >= 1
    private, lora = result["privatelora"], result["lora"]
    assert private["trainable_parameters"] == 5 * 3 * 4 * 4  # layers x q/k/v x r_c2d x r_d2c
    assert lora["trainable_parameters"] > private["trainable_parameters"]
    assert private["exchanges"] > 0 and private["bytes_up"] > 0
    for method in (private, lora):
        assert 0 <= method["exact"] <= 4 and 0.0 <= method["token_accuracy"] <= 1.0
        assert method["last_epoch_loss"] < method["first_epoch_loss"]
    assert result["privatelora_local_step_seconds_median"] > 0
    assert PrivateAdapters.load(saved).layers == list(range(5))

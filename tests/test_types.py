"""mypy (configured in pyproject.toml's [tool.mypy]) finds no errors in src/lambdasplit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_is_clean() -> None:
    # A cold run (no .mypy_cache) reads torch, transformers and diffusers: about two minutes on two cores.
    done = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # generous: a loaded CI machine took 4.5 min cold
    )
    assert done.returncode == 0, f"mypy failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"

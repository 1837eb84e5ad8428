"""mypy (configured in pyproject.toml's [tool.mypy]) finds no errors in src/lambdasplit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_is_clean() -> None:
    # A cold run (no .mypy_cache, as in a fresh CI checkout) reads torch, transformers and diffusers: about two
    # minutes on two cores with one process. Two worker processes (mypy's parallel checking) check the same files
    # with the same configuration and report the same errors, a third faster cold; a warm run takes seconds either way.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--num-workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # generous: a loaded CI machine took 4.5 min cold
    )
    assert done.returncode == 0, f"mypy failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"

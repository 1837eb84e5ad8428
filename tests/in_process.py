"""Run the ``lambdasplit`` console script or a script under ``benchmarks/`` in this process.

Every new Python process pays seconds of imports (torch, transformers, diffusers) before it does anything. A test
that runs a command many times keeps one run as a real process and sends the others through the same entry point
here: the same argv, the same exit code, the same output.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from lambdasplit.cli.app import run as cli_run


def lambdasplit(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """``lambdasplit ARGS`` through the console script's own entry point (``cli.app.run``, which turns our errors
    into one line and exit 2): (exit code, stdout, stderr)."""
    capsys.readouterr()  # what came before is not this run's
    monkeypatch.setattr(sys, "argv", ["lambdasplit", *args])
    with pytest.raises(SystemExit) as exit_:
        cli_run()
    out, err = capsys.readouterr()
    code = exit_.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def script(monkeypatch: pytest.MonkeyPatch, path: Path, *args: str) -> None:
    """``python PATH ARGS`` as ``__main__``; torch's global random state is restored after (scripts seed it)."""
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    with torch.random.fork_rng():
        runpy.run_path(str(path), run_name="__main__")

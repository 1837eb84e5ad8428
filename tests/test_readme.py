"""The README's two commands are the project's contract; CI must run the second one verbatim."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    block = ROOT.joinpath("README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_install_and_test_commands() -> None:
    main_job, tests = _commands()
    assert "torch==2.13.0" in main_job and "lambdasplit " in main_job
    assert "torch==2.13.0" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    ci = ROOT.joinpath(".ci/run").read_text().splitlines()
    assert _commands()[1] in ci

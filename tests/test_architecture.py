"""The package's structure, enforced: the import layers of pyproject.toml, and README's Layout section.

The contracts (``[tool.importlinter]`` in pyproject.toml) say which layer may import which; the research
suite (``lambdasplit.audit``) is fenced off from every product module. ``lint-imports`` checks them
statically, function-level imports included.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lambdasplit"


def lint_imports(src: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter's CLI on the package found under ``src`` with the contracts of ``config``."""
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [sys.executable, "-c", script, "--no-cache", "--no-logo", str(config)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT / "src", ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("planted", "imports", "broken"),
    [
        ("wire/planted.py", "from lambdasplit.server import base", "lambdasplit.wire.planted -> lambdasplit.server"),
        ("split/planted.py", "import lambdasplit.generation.session", "lambdasplit.split.planted -> lambdasplit.gen"),
        ("server/planted.py", "def f():\n    from lambdasplit.audit import run_audit", "lambdasplit.server.planted"),
    ],
)
def test_a_planted_upward_import_breaks_a_contract(tmp_path: Path, planted: str, imports: str, broken: str) -> None:
    """The contracts bite: one import against the layers (at module or function level) and lint-imports fails."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "lambdasplit", ignore=shutil.ignore_patterns("__pycache__", "default_model"))
    (src / "lambdasplit" / planted).write_text(f'"""Planted by the test."""\n\n{imports}\n')
    result = lint_imports(src, ROOT / "pyproject.toml")
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and broken in result.stdout, result.stdout


def test_every_package_appears_in_the_readme_layout() -> None:
    """README's Layout section names every subpackage of src/lambdasplit/ (as ``name/``)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\s{2}(\w+)/", section, flags=re.MULTILINE))
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages, "no packages found"
    assert packages <= listed, f"missing from README's Layout: {sorted(packages - listed)}"

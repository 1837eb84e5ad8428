"""The app lists its commands without importing them, and builds each one as Typer would have eagerly."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from lambdasplit.cli import app as cli_app


@pytest.mark.parametrize("name", list(cli_app.COMMANDS))
def test_each_listed_help_line_is_the_commands_own(name: str) -> None:
    command = cli_app.load(name)
    assert command.name == name
    first_paragraph = inspect.cleandoc(command.help or "").split("\n\n")[0].replace("\n", " ").strip()
    assert cli_app.COMMANDS[name][2] == first_paragraph, f"update {name}'s line in lambdasplit.cli.app.COMMANDS"


def test_every_command_module_is_listed() -> None:
    """A command module added under lambdasplit/cli but not to COMMANDS would be silently missing from the app."""
    helpers = {"__init__", "app", "cloud", "options"}
    modules = {path.stem for path in Path(cli_app.__file__).parent.glob("*.py")}
    assert modules - helpers == {module for module, _, _ in cli_app.COMMANDS.values()}


def test_a_command_runs_as_built_lazily() -> None:
    """The command the group resolves is the real one (its options parse), not the listing's placeholder."""
    group = typer.main.get_command(cli_app.app)
    assert isinstance(group, cli_app.LazyCommands)
    with group.make_context("lambdasplit", ["trust", "--help"], resilient_parsing=True) as ctx:
        _, command, _ = group.resolve_command(ctx, ["trust"])
    assert isinstance(command, typer.core.TyperGroup) and "fingerprint" in command.commands


@pytest.mark.parametrize("argv", [["--help"], ["bogus"], ["bnech"]])
def test_help_and_errors_import_no_command(argv: list[str]) -> None:
    """`lambdasplit --help` or a mistyped command: a fraction of a second, without torch (seconds to import)."""
    code = (
        "import sys\n"
        f"sys.argv = ['lambdasplit', *{argv!r}]\n"
        "from lambdasplit.cli.app import run\n"
        "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, code, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    *_, last = done.stderr.strip().splitlines()
    assert last.split() == ["False", "False", "0" if argv == ["--help"] else "2"], done.stderr
    if argv == ["bnech"]:
        assert "Did you mean 'bench'?" in done.stderr
    if argv == ["--help"]:
        assert all(name in done.stdout for name in cli_app.COMMANDS)

"""The ``lambdasplit`` Typer application: one module per command, registered here and imported when it runs.

A command's module imports what the command needs (torch, transformers, the server, the audit's attacks...):
seconds before anything happens. Importing all of them to build the app made every process pay for every
command, even ``lambdasplit --help`` or a mistyped option. So the app lists each command by name and its one-line
help, and imports the command's module only when that command runs or prints its own help.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from lambdasplit.errors import LambdaSplitError

if TYPE_CHECKING:
    from typer._click import Command, Context  # the click that Typer's classes are typed with (vendored in Typer)

#: Every command, in the order of ``lambdasplit --help``: name -> (module under lambdasplit.cli, the command
#: function or sub-app in it, the first paragraph of its help as ``lambdasplit --help`` lists it).
#: tests/cli/test_cli_app.py holds each line to the command's own help.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "demo",
        "demo",
        "Start a cloud body server on 127.0.0.1, generate a chat answer split across it, and show the traffic.",
    ),
    "generate": ("generate", "generate", "Generate text with the model split in three parts."),
    "verify": (
        "verify",
        "verify",
        "Compare the split with the unsplit model: logits at every step and greedy tokens. Exit 1 if they differ.",
    ),
    "chat": (
        "chat",
        "chat",
        "Chat with the model. Each answer streams as it is generated; the history is kept until /reset.",
    ),
    "serve": ("serve", "serve_command", "Serve the body (layers X..Y-1) of a model to devices over WebSocket."),
    "imagine": (
        "imagine",
        "imagine",
        "Draw PROMPT with a split pipeline: text encoders, initial noise, scheduler and VAE here; the U-Net (or its "
        "middle, or the first steps) on the server.",
    ),
    "up": (
        "up",
        "up",
        "Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a web UI.",
    ),
    "obfuscate": (
        "obfuscate",
        "obfuscate",
        "Draw a secret key and write the body transformed for it (STIP-style permutation or a rotation).",
    ),
    "audit": (
        "audit",
        "audit",
        "Run the attack suite on split inference of MODEL and print what each attacker recovers.",
    ),
    "personalize": (
        "personalize",
        "personalize",
        "Fine-tune private adapters on TEXT with the body in the cloud; write them to --out.",
    ),
    "plan": (
        "plan",
        "plan",
        "Pick the split: predict tokens/s, device memory, bytes per token and audited recovery of each candidate, "
        "and recommend one under your constraints (the paper's preparation phase).",
    ),
    "bench": ("bench", "app", "Measured benchmarks (traffic at the socket and on the wire, latency, tokens/s)."),
    "trust": (
        "trust",
        "app",
        "Servers trusted on first use (the known servers file, like SSH's known_hosts), and fingerprints.",
    ),
    "developer": (
        "developer",
        "app",
        "The STIP model developer's tools: make a private model from a public base, ship it as bundles.",
    ),
    "collafuse": (
        "collafuse",
        "app",
        "CollaFuse: train a split diffusion model with several clients whose images stay home.",
    ),
}


class _Listed(TyperCommand):
    """A command as ``lambdasplit --help`` lists it (name and help line); its module is not imported yet."""


class LazyCommands(TyperGroup):
    """The app's commands: listed from ``COMMANDS``, each built from its module when it is resolved to run."""

    def __init__(self, **attrs: Any) -> None:  # Typer's settings for the group, passed through
        super().__init__(**attrs)
        for name, (_, _, summary) in COMMANDS.items():
            self.commands[name] = _Listed(name, help=summary)

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[str | None, Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and isinstance(command, _Listed):
            command = self.commands[name] = load(name)
        return name, command, rest


def load(name: str) -> Command:
    """Import command ``name``'s module and build the command exactly as Typer builds one registered on ``app``:
    registered on an app with ``app``'s settings."""
    module, attribute, _ = COMMANDS[name]
    target = getattr(importlib.import_module(f"lambdasplit.cli.{module}"), attribute)
    holder = typer.Typer(rich_markup_mode=app.rich_markup_mode, pretty_exceptions_short=app.pretty_exceptions_short)
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(target)
    return typer.main.get_group(holder).commands[name]


app = typer.Typer(
    name="lambdasplit",
    cls=LazyCommands,
    help="Split inference of generative models: head and tail on your device, the body in the cloud.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
)


@app.callback()
def _commands_follow() -> None:
    """(Typer builds a group only for an app with a callback or registered commands; ours are in COMMANDS.)"""


def run() -> None:
    """Run the app; our own errors print as one clear line (exit 2), not a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except LambdaSplitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)

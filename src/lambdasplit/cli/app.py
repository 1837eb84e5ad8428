"""The ``lambdasplit`` Typer application: one module per command, registered here."""

from __future__ import annotations

import logging
import sys

import typer

from lambdasplit.cli import (
    audit,
    bench,
    chat,
    collafuse,
    demo,
    developer,
    generate,
    imagine,
    obfuscate,
    personalize,
    plan,
    serve,
    trust,
    up,
    verify,
)
from lambdasplit.errors import LambdaSplitError

app = typer.Typer(
    name="lambdasplit",
    help="Split inference of generative models: head and tail on your device, the body in the cloud.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
)
app.command("demo")(demo.demo)
app.command("generate")(generate.generate)
app.command("verify")(verify.verify)
app.command("chat")(chat.chat)
app.command("serve")(serve.serve_command)
app.command("imagine")(imagine.imagine)
app.command("up")(up.up)
app.command("obfuscate")(obfuscate.obfuscate)
app.command("audit")(audit.audit)
app.command("personalize")(personalize.personalize)
app.command("plan")(plan.plan)
app.add_typer(bench.app, name="bench")
app.add_typer(trust.app, name="trust")
app.add_typer(developer.app, name="developer")
app.add_typer(collafuse.app, name="collafuse")


def run() -> None:
    """Run the app; our own errors print as one clear line (exit 2), not a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except LambdaSplitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)

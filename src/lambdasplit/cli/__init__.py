"""The ``lambdasplit`` command line. ``main`` is the console-script entry point."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main() -> None:
    """Set process-wide defaults that must precede ``import torch``, then run the Typer app.

    OMP_WAIT_POLICY=PASSIVE, and for ``serve`` GOMP_SPINCOUNT: how torch's idle OpenMP threads wait
    (``cpus.openmp_waiting``: a device and a body server sharing cores steal each other's CPU when they spin long;
    a body server's second thread should stay awake through a forward). Values the user set are kept.

    OMP_NUM_THREADS: where a cgroup CPU quota (a container's ``--cpus``) allows fewer CPUs than the machine shows,
    torch's threads are capped to it (``cpus.thread_cap``; ``--threads`` and a value the user set still win).

    Process lifetime (``lifetime``): this process ends with a lambdasplit parent, and ends cleanly on SIGTERM and
    SIGHUP, so no child outlives it.
    """
    from lambdasplit.cpus import openmp_waiting, thread_cap

    os.environ.update(openmp_waiting(serving=_command(sys.argv[1:]) == "serve"))
    os.environ.update(thread_cap())
    from lambdasplit.lifetime import exit_on_termination, watch_parent

    watch_parent()  # a child of another lambdasplit command ends with it (lifetime.py)
    exit_on_termination()  # SIGTERM and SIGHUP clean up as Ctrl-C does: children stop with this process
    from lambdasplit.cli.app import run

    run()


def _command(args: Sequence[str]) -> str | None:
    """The subcommand a command line runs (its first word that is not an option), before Typer parses it."""
    return next((arg for arg in args if not arg.startswith("-")), None)

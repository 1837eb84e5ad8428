"""The ``lambdasplit`` command line. ``main`` is the console-script entry point."""

from __future__ import annotations

import os


def main() -> None:
    """Set process-wide defaults that must precede ``import torch``, then run the Typer app.

    OMP_WAIT_POLICY=PASSIVE: by default libgomp's idle threads spin after every parallel region. A device
    and a body server sharing cores (and any two processes taking turns, as split inference does) then
    steal each other's CPU: measured on 2 cores with SmolLM2 at 2:28, the body's forward took 48.7 ms
    instead of 42.8 ms. A value the user set is kept.

    OMP_NUM_THREADS: where a cgroup CPU quota (a container's ``--cpus``) allows fewer CPUs than the machine shows,
    torch's threads are capped to it (``cpus.thread_cap``; ``--threads`` and a value the user set still win).

    Process lifetime (``lifetime``): this process ends with a lambdasplit parent, and ends cleanly on SIGTERM and
    SIGHUP, so no child outlives it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lambdasplit.cpus import thread_cap

    os.environ.update(thread_cap())
    from lambdasplit.lifetime import exit_on_termination, watch_parent

    watch_parent()  # a child of another lambdasplit command ends with it (lifetime.py)
    exit_on_termination()  # SIGTERM and SIGHUP clean up as Ctrl-C does: children stop with this process
    from lambdasplit.cli.app import run

    run()

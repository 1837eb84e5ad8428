"""Processes that end with their parent: a child never outlives the command that started it.

Two halves, both set up by ``lambdasplit.cli.main`` (and by the delay line, which runs without the package's CLI):

- **The parent ends cleanly on SIGTERM and SIGHUP** (what ``kill``, systemd, ``docker stop`` and a closed terminal
  send), not only on Ctrl-C: ``exit_on_termination`` turns both into ``SystemExit``, so every ``with`` block that
  started a child (``server.process.lambdasplit_process``) stops it on the way out.
- **A child ends when its parent is gone, however it went** (SIGKILL and crashes included, where no cleanup
  runs): a child started with ``child_environment`` watches its parent (``watch_parent``) and sends itself SIGTERM
  once it has been re-parented, so it takes its own clean exit path.

Why a watcher rather than Linux's ``PR_SET_PDEATHSIG``: that signal follows the *thread* that forked the child, not
the process, and our servers are started from worker threads (a thread pool starts both share servers at once);
they would be killed when the pool's threads end. Polling ``getppid`` twice a second costs nothing measurable and
works on every POSIX system.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

PARENT_ENV = "LAMBDASPLIT_PARENT_PID"
POLL_SECONDS = 0.5
GRACE_SECONDS = 10.0  # after its SIGTERM, how long a child may take to exit before it is ended outright
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) plus the marker that makes a lambdasplit child watch this process."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def watch_parent() -> threading.Thread | None:
    """In a child started with ``child_environment``: end this process when its parent is gone; ``None`` elsewhere.

    The marker is taken out of the environment, so this process's own children watch it, not its parent.
    """
    value = os.environ.pop(PARENT_ENV, None)
    if value is None or not value.isdigit() or sys.platform == "win32":
        return None
    parent = int(value)
    if os.getppid() != parent:  # gone before we looked
        os._exit(128 + signal.SIGTERM)
    watcher = threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True)
    watcher.start()
    return watcher


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # this process's own clean exit: servers stop, their children with them
    time.sleep(GRACE_SECONDS)
    os._exit(128 + signal.SIGTERM)


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` in the main thread, as Ctrl-C raises
    ``KeyboardInterrupt``: cleanup runs. (A server that installs its own handlers, as uvicorn does, replaces these.)"""

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, leave)


def end_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child that is not a lambdasplit command (tcpdump): Linux sends it SIGTERM when the
    thread that starts it ends (``PR_SET_PDEATHSIG``), so call ``Popen`` from the main thread. None elsewhere.

    ``libc.prctl`` is looked up here, before the fork: the function the child runs does nothing but call it.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    term = int(signal.SIGTERM)

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0)

    return set_parent_death_signal

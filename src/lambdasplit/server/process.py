"""Run `lambdasplit serve` (or `up`) as a child process; wait for its ready line (demo, `up --cloud local`, tests)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from lambdasplit.errors import LambdaSplitError
from lambdasplit.lifetime import child_environment
from lambdasplit.server.run import READY


@contextmanager
def body_server_process(
    args: Sequence[str],
    *,
    token: str | None = None,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Iterator[str]:
    """Yield the URL of ``lambdasplit serve --port 0 ARGS`` once it listens; stop it (SIGINT, then kill) after.

    (The ready line may go on after the URL with the certificate's fingerprint: ``lambdasplit_process`` yields
    all of it.)

    ``wrap`` rewrites the command line, e.g. to run it in another network namespace (the benchmark's links).
    The token travels in the child's environment, not its command line, where `ps` would show it.
    """
    with lambdasplit_process(
        ["serve", "--port", "0", *args], READY, token=token, timeout=timeout, env=env, wrap=wrap
    ) as ready:
        yield ready.split()[0]


@contextmanager
def lambdasplit_process(
    argv: Sequence[str],
    ready: str,
    *,
    token: str | None = None,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Iterator[str]:
    """Run ``lambdasplit ARGV``; yield what follows ``ready`` on the line that starts with it; stop it after."""
    child_env = child_environment({**os.environ, **(env or {})})  # the child ends if this process goes
    if token is not None:
        child_env["LAMBDASPLIT_TOKEN"] = token
    command = [sys.executable, "-c", "from lambdasplit.cli import main; main()", *argv]
    proc = subprocess.Popen(
        wrap(command) if wrap else command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=child_env,
    )
    stderr: list[str] = []
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr or ()), daemon=True)
    reader.start()

    def forward_lines() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    threading.Thread(target=forward_lines, daemon=True).start()
    try:
        yield _wait_ready(proc, lines, ready, timeout, stderr, argv[0])
    except Exception:
        # The caller's work with the child failed: what the child said is often why (shown with the failure).
        stop_process(proc)
        reader.join(timeout=2)
        if stderr:
            print(f"--- stderr of lambdasplit {argv[0]} (last 40 lines) ---\n", *stderr[-40:], sep="", file=sys.stderr)
        raise
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGINT, timeout: float = 10.0) -> None:
    """Ask a child to stop with ``sig`` (it cleans up), kill it if it has not within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(
    proc: subprocess.Popen[str], lines: queue.Queue[str], ready: str, timeout: float, stderr: list[str], name: str
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line.startswith(ready):
            return line[len(ready) :].strip()
    proc.kill()
    tail = "".join(stderr)[-3000:]
    raise LambdaSplitError(f"`lambdasplit {name}` did not start within {timeout:.0f} s (exit {proc.poll()}):\n{tail}")

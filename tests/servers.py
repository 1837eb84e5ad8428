"""Start `lambdasplit serve` as a real subprocess on loopback and wait for its ready line."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

READY = "lambdasplit-serve: listening on "


@contextmanager
def body_server(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the ws:// URL of a body server started with ``lambdasplit serve --port 0 ARGS``; stop it after."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lambdasplit.cli import main; main()", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    stderr: list[str] = []
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        url = _wait_ready(proc, lines, timeout, stderr)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[str], lines: queue.Queue[str], timeout: float, stderr: list[str]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line.startswith(READY):
            return line[len(READY) :].strip()
    raise RuntimeError(f"body server did not start (exit {proc.poll()}):\n{''.join(stderr)[-3000:]}")


def http_url(ws_url: str, path: str) -> str:
    return ws_url.replace("ws://", "http://").replace("wss://", "https://").removesuffix("/v1/split") + path

"""No child outlives its lambdasplit parent, whatever ends the parent: SIGTERM, SIGHUP or SIGKILL to
`lambdasplit up --cloud local` and to `lambdasplit demo` leave no process behind (lifetime.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambdasplit.agent.run import READY as UP_READY
from lambdasplit.lifetime import GRACE_SECONDS, PARENT_ENV

SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended; only its parent's wait is missing


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def start(argv: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != PARENT_ENV}
    command = [sys.executable, "-c", "from lambdasplit.cli import main; main()", *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def end(proc: subprocess.Popen[str], sig: int, kids: list[int]) -> None:
    """Send ``sig`` to ``proc``; it and every child it had must be gone well within the grace time."""
    assert kids, "the command started no child process"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    left = wait_gone(kids, GRACE_SECONDS + 5)
    for pid in left:  # keep the machine clean whatever the verdict
        os.kill(pid, signal.SIGKILL)
    assert not left, f"children {left} outlived `{proc.args}` after {signal.Signals(sig).name}"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_up_with_a_local_cloud_leaves_no_child_behind(tiny_checkpoint, sig: int) -> None:
    path, _ = tiny_checkpoint("llama")
    proc = start(["up", "--cloud", "local", "--model", str(path), "--layers", "1:4", "--port", "0", "--no-attack"])
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # the agent serves: the body server child is up and paired
            if line.startswith(UP_READY) or time.monotonic() > deadline:
                break
        assert line.startswith(UP_READY), line
        end(proc, sig, children(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()


# SIGHUP is not repeated here: in `demo` (no uvicorn in the parent) SIGTERM and SIGHUP reach the same handler,
# installed for both by lifetime.exit_on_termination; `up` above gets both, as uvicorn takes SIGTERM there and SIGHUP
# still goes to that handler.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_demo_ended_while_its_server_starts_leaves_no_child_behind(tiny_checkpoint, sig: int) -> None:
    path, _ = tiny_checkpoint("llama")
    proc = start(["demo", "--model", str(path), "--layers", "1:4", "-n", "200"])
    try:
        deadline = time.monotonic() + 60
        while not (kids := children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the body server child is importing torch: mid-start, the hardest moment to clean up
        end(proc, sig, kids)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_foreign_child_ends_with_the_thread_that_started_it() -> None:
    """tcpdump's way (``end_with_this_process``): a plain program, SIGKILL to its parent, the kernel ends it."""
    code = (
        "import subprocess, time; from lambdasplit.lifetime import end_with_this_process; "
        "p = subprocess.Popen(['sleep', '60'], preexec_fn=end_with_this_process()); print(p.pid, flush=True); "
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    end(parent, signal.SIGKILL, [child])

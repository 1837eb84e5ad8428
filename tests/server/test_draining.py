"""Rolling restarts without losing a token: `serve` drains on SIGTERM (refuses new devices, sends GOAWAY, serves the
steps in flight, exits when its devices have moved), and devices that know another URL move before the connection
drops, so every generation ends exactly as on one server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from lambdasplit.client import connect_device
from lambdasplit.generation import stream
from lambdasplit.server.run import READY
from lambdasplit.split import load_split
from lambdasplit.wire import MessageType, decode_frame

LAYERS = "1:4"
# The stop comes once every device has 8 tokens; devices move a few steps later (at tokens 9 to 13 here: the
# server's loop handles the signal between the steps it serves), so 64 leaves every device some 50 tokens to
# generate on the server it moved to.
DEVICES, NEW, DRAIN = 8, 64, 20.0
PROMPTS = [f"device {i} asks about the quick brown fox number {i}" for i in range(DEVICES)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(path: str, port: int, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`lambdasplit serve` on ``port``, as a process the test can signal; killed at the end whatever happened."""
    argv = ["serve", "--model", path, "--layers", LAYERS, "--port", str(port), "--drain-seconds", str(DRAIN), *extra]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lambdasplit.cli import main; main()", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY):
                break
        else:
            raise AssertionError(f"serve on port {port} did not start (exit {proc.wait()})")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1/split"


def generate_everywhere(path: str, urls: list[str], stop: subprocess.Popen[str]) -> list[tuple[list[int], int, float]]:
    """Every device generates NEW tokens over ``urls`` (the first is where it starts); once all are under way,
    ``stop`` gets SIGTERM. Per device: (tokens, moves, seconds its recoveries took)."""
    results: list[tuple[list[int], int, float] | None] = [None] * DEVICES
    errors: list[BaseException] = []
    under_way = threading.Barrier(DEVICES + 1)

    def device(i: int) -> None:
        try:
            split, conn = connect_device(urls, path)
            with conn:
                run = stream(split, PROMPTS[i], max_new_tokens=NEW, ignore_eos=True, link=(link := conn.open_session()))
                for n, _ in enumerate(run, 1):
                    if n == 8:
                        under_way.wait(timeout=120)
                assert run.result is not None
                lost = sum(r.seconds for r in link.recoveries)
                results[i] = (run.result.token_ids, conn.moves, lost)
        except BaseException as e:
            errors.append(e)
            under_way.abort()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(DEVICES)]
    for t in threads:
        t.start()
    under_way.wait(timeout=120)
    stop.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_a_rolling_restart_loses_no_token(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint("llama")[0])
    local = load_split(path, LAYERS)
    expected = []
    for prompt in PROMPTS:
        run = stream(local, prompt, max_new_tokens=NEW, ignore_eos=True)
        expected.append(run.run().token_ids)
    a, b = free_port(), free_port()
    with server(path, a) as first, server(path, b) as second:
        start = time.monotonic()
        results = generate_everywhere(path, [url(a), url(b)], first)
        assert first.wait(timeout=DRAIN + 10) == 0
        took = time.monotonic() - start
        assert took < DRAIN, took  # it left as soon as its devices had moved, not at the deadline
        assert [tokens for tokens, _, _ in results] == expected
        assert all(moves == 1 for _, moves, _ in results)
        print("\nfirst server stopped: time lost per device (s):", [round(lost, 3) for _, _, lost in results])

        with server(path, a):  # the first comes back; now the second is restarted
            results = generate_everywhere(path, [url(b), url(a)], second)
            assert second.wait(timeout=DRAIN + 10) == 0
        assert [tokens for tokens, _, _ in results] == expected
        assert all(moves == 1 for _, moves, _ in results)
        print("second server stopped: time lost per device (s):", [round(lost, 3) for _, _, lost in results])


def test_a_draining_server_says_so_refuses_newcomers_and_waits_for_its_devices(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint("llama")[0])
    port = free_port()
    with server(path, port) as proc:
        with connect(url(port), open_timeout=10) as held:  # a device that never moves
            request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/drain?seconds=30", method="POST")
            with urllib.request.urlopen(request, timeout=5) as r:
                assert json.loads(r.read())["status"] == "draining"
            goaway = decode_frame(held.recv(timeout=5))
            assert goaway.type is MessageType.GOAWAY and goaway.json_body()["deadline_s"] == 30
            status = health(port)
            assert status["status"] == "draining" and 0 < status["deadline_s"] <= 30
            with pytest.raises(InvalidStatus) as refused:
                connect(url(port), open_timeout=10)
            assert refused.value.response.status_code == 503
            assert json.loads(refused.value.response.body)["error"]["code"] == "draining"
            time.sleep(0.5)
            assert proc.poll() is None  # still serving its device
        assert proc.wait(timeout=10) == 0  # its last device left: it exits, long before the deadline

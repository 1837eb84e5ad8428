"""Test helpers for body servers started as real subprocesses (see lambdasplit.server.process)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import uvicorn

from lambdasplit.server.process import body_server_process


@contextmanager
def body_server(*args: str, token: str | None = None) -> Iterator[str]:
    """``lambdasplit serve ARGS`` on loopback; its URL. It computes on as many torch threads as this process (unless
    ARGS say otherwise): tests compare its outputs with this process's bit for bit, and float32 sums differ with
    the thread count."""
    threads = () if "--threads" in args else ("--threads", str(torch.get_num_threads()))
    with body_server_process((*args, *threads), token=token, timeout=120) as url:
        yield url


T = TypeVar("T")


def in_threads(work: Callable[[int], T], n: int, timeout: float = 180) -> list[T]:
    """``work(i)`` for i in range(n), each in its own thread, all at once; results in order. Errors re-raise."""
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    return [results[i] for i in range(n)]


def http_url(ws_url: str, path: str) -> str:
    return ws_url.replace("ws://", "http://").replace("wss://", "https://").removesuffix("/v1/split") + path


def proc_kill(port: int) -> None:
    """SIGKILL the process listening on ``port`` (no clean shutdown: a crash)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    os.kill(int(out.split("pid=")[1].split(",")[0]), signal.SIGKILL)


@contextmanager
def app_in_thread(app: Any, timeout: float = 60, **options: Any) -> Iterator[int]:
    """An ASGI app (a server's ``app``) served on 127.0.0.1 at a free port by uvicorn on a thread of this process (so
    a test can reach into the server); yields the port, stops it on exit. ``options`` go to ``uvicorn.Config``."""
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not http.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield http.servers[0].sockets[0].getsockname()[1]
    finally:
        http.should_exit = True
        thread.join(timeout=10)

"""Test helpers for body servers started as real subprocesses (see lambdasplit.server.process)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lambdasplit.server.process import body_server_process


@contextmanager
def body_server(*args: str, token: str | None = None) -> Iterator[str]:
    with body_server_process(args, token=token, timeout=120) as url:
        yield url


def http_url(ws_url: str, path: str) -> str:
    return ws_url.replace("ws://", "http://").replace("wss://", "https://").removesuffix("/v1/split") + path

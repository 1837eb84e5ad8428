"""``syncws``: the blocking session servers (share servers, PrivateLoRA, CollaFuse) refuse a handshake without one
of their bearer tokens, and a device's ``connect_session`` says which way it was refused (``auth``)."""

from __future__ import annotations

import contextlib

import pytest
from websockets.sync.server import ServerConnection

from lambdasplit.auth import bearer_authorized
from lambdasplit.errors import RemoteError
from lambdasplit.syncws import SessionServer, connect_session
from lambdasplit.tls import TlsTrust


def echo(ws: ServerConnection) -> None:
    ws.send(ws.recv(timeout=5))


def server(tokens: tuple[str, ...]) -> SessionServer:
    return SessionServer(echo, "127.0.0.1", 0, max_size=1 << 16, timeout=5, ssl=None, name="echo", tokens=tokens)


def session(url: str, token: str | None) -> str:
    with contextlib.ExitStack() as stack:
        ws = connect_session(
            url, what="the echo server", exposes="nothing", trust=TlsTrust(), timeout=5, max_size=1 << 16,
            stack=stack, token=token,
        )  # fmt: skip
        ws.send("hello")
        return str(ws.recv(timeout=5))


def test_a_server_with_tokens_serves_only_a_device_that_presents_one() -> None:
    with server(("first", "second")) as s:
        with pytest.raises(RemoteError, match="needs a bearer token") as missing:
            session(s.url, None)
        with pytest.raises(RemoteError, match="refused the bearer token") as wrong:
            session(s.url, "third")
        assert missing.value.code == wrong.value.code == "unauthorized"
        assert s.refused == 2
        assert session(s.url, "first") == session(s.url, "second") == "hello"
        assert s.refused == 2


def test_a_server_without_tokens_serves_anyone() -> None:
    with server(()) as s:
        assert session(s.url, None) == session(s.url, "anything") == "hello"


def test_the_header_must_name_a_token_exactly() -> None:
    assert bearer_authorized("Bearer abc", ["xyz", "abc"])
    assert not bearer_authorized("Bearer abcd", ["abc"]) and not bearer_authorized("abc ", ["abc"])
    assert not bearer_authorized(None, ["abc"]) and not bearer_authorized("Bearer ", ["abc"])
    assert bearer_authorized(None, []) and bearer_authorized("Bearer whatever", ())

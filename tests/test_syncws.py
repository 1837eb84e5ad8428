"""``syncws``: the blocking session servers (share servers, PrivateLoRA, CollaFuse) refuse a handshake without one
of their bearer tokens, and a device's ``connect_session`` says which way it was refused (``auth``); a draining
server refuses newcomers and waits, within its deadline, for the sessions in progress."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection

from lambdasplit.auth import bearer_authorized
from lambdasplit.errors import RemoteError
from lambdasplit.syncws import SessionServer, connect_session
from lambdasplit.tls import TlsTrust


def echo(ws: ServerConnection) -> None:
    ws.send(ws.recv(timeout=5))


def server(tokens: tuple[str, ...]) -> SessionServer:
    return SessionServer(echo, "127.0.0.1", 0, max_size=1 << 16, timeout=5, ssl=None, name="echo", tokens=tokens)


def running(s: SessionServer, sessions: int) -> None:
    """Wait (up to 10 s) until ``s`` runs ``sessions`` handlers."""
    deadline = time.monotonic() + 10
    while s._active != sessions:
        assert time.monotonic() < deadline, f"{s._active} sessions running, expected {sessions}"
        time.sleep(0.01)


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


def test_draining_refuses_newcomers_and_waits_for_the_sessions_in_progress() -> None:
    with server(()) as s, contextlib.ExitStack() as stack:
        ws = connect_session(
            s.url, what="the echo server", exposes="nothing", trust=TlsTrust(), timeout=5, max_size=1 << 16,
            stack=stack,
        )  # fmt: skip
        running(s, 1)  # the handshake answers before the handler's thread counts the session
        waited = ThreadPoolExecutor(1).submit(s.drain, 10)
        time.sleep(0.2)
        assert s.draining and not waited.done()  # the session in progress holds the drain
        with pytest.raises(RemoteError, match="draining") as refused:
            session(s.url, None)
        assert refused.value.code == "draining"
        ws.send("still served")
        assert ws.recv(timeout=5) == "still served"  # the handler answers once, then ends its session
        assert waited.result(timeout=5) == 0


def test_a_drain_ends_at_its_deadline_with_the_sessions_left() -> None:
    def hold(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            ws.recv(timeout=5)

    s = SessionServer(hold, "127.0.0.1", 0, max_size=1 << 16, timeout=5, ssl=None, name="hold")
    with s, contextlib.ExitStack() as stack:
        connect_session(
            s.url, what="the hold server", exposes="nothing", trust=TlsTrust(), timeout=5, max_size=1 << 16,
            stack=stack,
        )  # fmt: skip
        running(s, 1)
        started = time.monotonic()
        assert s.drain(0.3) == 1
        assert 0.25 < time.monotonic() - started < 2


def test_one_session_over_the_limit_is_told_busy_and_the_next_after_is_served() -> None:
    """``max_sessions`` (share and PrivateLoRA servers' --max-sessions): the servers count the sessions running."""
    release = threading.Event()

    def held(ws: ServerConnection) -> None:
        ws.send("in")
        release.wait(10)

    with SessionServer(held, "127.0.0.1", 0, max_size=1 << 16, timeout=5, ssl=None, name="one", max_sessions=1) as s:
        with connect(s.url, open_timeout=5) as first:
            assert first.recv(timeout=5) == "in"
            with connect(s.url, open_timeout=5) as second:
                refused = json.loads(second.recv(timeout=5))
            assert refused["type"] == "error" and refused["code"] == "busy"
            assert "limit of 1 sessions" in refused["message"]
            release.set()
        release.clear()
        running(s, 0)  # the first handler returns once released
        with connect(s.url, open_timeout=5) as third:
            assert third.recv(timeout=5) == "in"
        release.set()


def test_a_drain_waits_for_a_session_whose_handler_has_not_started_yet() -> None:
    """The handshake is answered on the connection's thread before the handler starts there: a drain in between
    must still wait for that session (it used to count only running handlers, and returned at once)."""
    served = threading.Event()

    def answer(ws: ServerConnection) -> None:
        echo(ws)
        served.set()

    class LateStart(SessionServer):
        def _run(self, connection: ServerConnection) -> None:
            time.sleep(0.5)  # the connection's thread is slow to reach the handler (a busy machine)
            super()._run(connection)

    s = LateStart(answer, "127.0.0.1", 0, max_size=1 << 16, timeout=5, ssl=None, name="late")
    with s, contextlib.ExitStack() as stack:
        ws = connect_session(
            s.url, what="the late server", exposes="nothing", trust=TlsTrust(), timeout=5, max_size=1 << 16,
            stack=stack,
        )  # fmt: skip
        waited = ThreadPoolExecutor(1).submit(lambda: (s.drain(10), served.is_set()))
        ws.send("served before the drain ends")
        assert ws.recv(timeout=5) == "served before the drain ends"
        assert waited.result(timeout=5) == (0, True)


def test_a_handshake_that_fails_after_its_answer_does_not_hold_a_drain() -> None:
    """A connection whose thread ends without reaching the handler stops counting."""
    s = server(())
    with s:
        connection = object()
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        s._accepted[connection] = thread  # type: ignore[index]
        assert session(s.url, None) == "hello"  # the next handshake forgets it: a busy server does not pile them up
        assert connection not in s._accepted
        s._accepted[connection] = thread  # type: ignore[index]
        started = time.monotonic()
        assert s.drain(5) == 0 and time.monotonic() - started < 1

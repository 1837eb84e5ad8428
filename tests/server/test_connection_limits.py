"""Limits a hostile or broken client cannot exhaust: WebSocket connections per client address (refused before the
upgrade with HTTP 503 and the documented error) and handshakes that never complete (closed after the timeout),
while a legitimate device on the same server is served."""

from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from lambdasplit.client import connect_device
from lambdasplit.errors import ConfigError
from lambdasplit.generation import generate
from lambdasplit.server import ServerSettings
from lambdasplit.split import load_split
from servers import body_server

LAYERS = "1:4"
CAP, HANDSHAKE = 3, 1.0


def from_address(url: str, source: str) -> ClientConnection:
    """A WebSocket connection to ``url`` whose TCP source address is ``source`` (another 127.x client)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10, source_address=(source, 0))
    return connect(url, sock=sock, open_timeout=10)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_client_over_its_connection_cap_is_refused_and_others_are_served(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    args = ["--model", str(path), "--layers", LAYERS, "--max-connections-per-client", str(CAP)]
    args += ["--handshake-timeout", str(HANDSHAKE)]
    expected = generate(load_split(path, LAYERS), "the quick brown", max_new_tokens=4, ignore_eos=True).token_ids
    with body_server(*args) as url, ExitStack() as held:
        for _ in range(CAP):  # a client that opens connections and keeps them
            held.enter_context(from_address(url, "127.0.0.2"))
        with pytest.raises(InvalidStatus) as refused:
            from_address(url, "127.0.0.2")
        response = refused.value.response
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        error = json.loads(response.body)["error"]
        assert error["code"] == "too_many_connections" and "127.0.0.2" in error["message"]

        # sockets that connect and never finish the upgrade: closed after the handshake timeout
        host, port = urlsplit(url).hostname, urlsplit(url).port
        silent = socket.create_connection((host, port), source_address=("127.0.0.3", 0))
        trickle = socket.create_connection((host, port), source_address=("127.0.0.3", 0))
        trickle.sendall(b"GET /v1/split HTTP/1.1\r\nHost: x\r\n")  # headers never end
        start = time.monotonic()
        assert closed_by_server(silent, HANDSHAKE + 5) and closed_by_server(trickle, HANDSHAKE + 5)
        assert time.monotonic() - start < HANDSHAKE + 5

        # a legitimate device (127.0.0.1) is served while the hostile client holds its cap
        split, conn = connect_device(url, path)
        with conn:
            got = generate(split, "the quick brown", max_new_tokens=4, ignore_eos=True, link=conn.open_session())
        assert got.token_ids == expected

        held.close()  # the hostile client lets go: its address may connect again
        time.sleep(0.5)
        with from_address(url, "127.0.0.2") as again:
            again.close()


def test_the_total_connection_cap_refuses_every_address(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    args = ["--model", str(path), "--layers", LAYERS, "--max-connections", "2", "--max-connections-per-client", "2"]
    with body_server(*args) as url, ExitStack() as held:
        held.enter_context(from_address(url, "127.0.0.2"))
        held.enter_context(from_address(url, "127.0.0.4"))
        with pytest.raises(InvalidStatus) as refused:
            from_address(url, "127.0.0.5")
        error = json.loads(refused.value.response.body)["error"]
        assert error["code"] == "too_many_connections" and "(max_connections)" in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_connections", 0), ("max_connections_per_client", 0), ("handshake_timeout", 0.0)],
)
def test_connection_limits_are_checked(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        ServerSettings(**{field: value})
    with pytest.raises(ConfigError, match="max_connections_per_client"):
        ServerSettings(max_connections=4, max_connections_per_client=5)

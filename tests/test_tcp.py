"""The body link's congestion control (``lambdasplit.tcp``): asked for before connecting on the device, on the
listening socket on the server, so that both ends of a real connection use it; a name the kernel refuses leaves
the system's and still connects."""

from __future__ import annotations

import socket
import subprocess
from urllib.parse import urlsplit

import pytest

from lambdasplit import tcp
from lambdasplit.client.connection import CloudClient

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="the kernel cannot choose (not Linux)")

#: Built into every Linux kernel and allowed for every process, unlike cubic's rivals; not this machine's default,
#: so a socket that reports it was asked for it.
ASKED = "reno"


def system_default() -> str:
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        return f.read().strip()


def test_the_name_comes_from_the_argument_the_environment_or_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tcp.ENV, raising=False)
    assert tcp.wanted() == tcp.DEFAULT == "cubic"
    assert tcp.wanted("reno") == "reno"
    monkeypatch.setenv(tcp.ENV, "system")
    assert tcp.wanted() is None
    assert tcp.wanted(" ") is None
    assert not tcp.prefer(socket.socket())  # nothing asked for: the kernel's stays


def test_connect_asks_before_connecting_and_a_refused_name_still_connects() -> None:
    if system_default() == ASKED:
        pytest.skip(f"{ASKED} is this kernel's default: a socket using it proves nothing")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with tcp.connect("127.0.0.1", port, 5, ASKED) as sock:
            accepted, _ = listener.accept()
            with accepted:
                assert tcp.algorithm(sock) == ASKED
        with tcp.connect("localhost", port, 5, "no-such-algorithm") as sock:
            listener.accept()[0].close()
            assert tcp.algorithm(sock) == system_default()
        listener.close()
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more: the error of the last address
        tcp.connect("127.0.0.1", port, 5, ASKED)


def test_both_ends_of_a_device_connection_use_the_algorithm_asked_for(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint
) -> None:
    from servers import body_server

    if system_default() == ASKED:
        pytest.skip(f"{ASKED} is this kernel's default: a socket using it proves nothing")
    monkeypatch.setenv(tcp.ENV, ASKED)  # this process (the device) and the server started below
    path, _ = tiny_checkpoint("llama")
    with body_server("--model", str(path), "--layers", "1:3") as url, CloudClient(url, timeout=30) as client:
        assert client._sock is not None and tcp.algorithm(client._sock) == ASKED
        port = urlsplit(url).port
        ss = ["ss", "-Htin", "state", "established", f"( sport = :{port} )"]
        server_side = subprocess.run(ss, capture_output=True, text=True, check=True).stdout.split()
        assert ASKED in server_side and system_default() not in server_side

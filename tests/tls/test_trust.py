"""What a device trusts, against a real TLS listener in this process: pins, CAs, first use, and the token.

The listener completes the TLS handshake and records every byte of application data the client sends
after it, so "refused before anything was sent" is checked on the wire, not assumed.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lambdasplit.client import CloudClient
from lambdasplit.errors import ConfigError, UntrustedCertificate, WireError
from lambdasplit.tls import KnownServers, TlsTrust, self_signed, server_address
from lambdasplit.tls.certificate import ServerCertificate

WRONG = "SHA256:" + "A" * 42 + "E"


@dataclass
class Listener:
    port: int
    cert: ServerCertificate
    received: bytearray = field(default_factory=bytearray)
    handshakes: int = 0
    finished: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def settle(self) -> None:
        """Wait until the connection the client just made is over on the listener's side too."""
        assert self.finished.acquire(timeout=5), "the listener did not finish the connection"

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/v1/split"


@contextmanager
def tls_listener(cert: ServerCertificate) -> Iterator[Listener]:
    """Accepts connections one by one, shakes hands, reads what the client sends, answers nothing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    listener = Listener(server.getsockname()[1], cert)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = server.accept()
            except TimeoutError:
                continue
            with raw:
                raw.settimeout(2)
                try:
                    with context.wrap_socket(raw, server_side=True) as tls:
                        listener.handshakes += 1
                        while data := tls.recv(65536):
                            listener.received += data
                            if b"\r\n\r\n" in data:
                                break  # a WebSocket upgrade request: hang up without an answer
                except (ssl.SSLError, OSError):
                    pass
                finally:
                    listener.finished.release()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@pytest.fixture
def listener(tmp_path) -> Iterator[Listener]:
    with tls_listener(self_signed(tmp_path / "server")) as it:
        yield it


def connect(url: str, trust: TlsTrust, token: str | None = "s3cret", timeout: float = 1.5) -> CloudClient:
    return CloudClient(url, token=token, trust=trust, timeout=timeout)


def test_a_wrong_pin_is_refused_after_the_handshake_before_a_byte_is_sent(listener: Listener, tmp_path) -> None:
    with pytest.raises(UntrustedCertificate) as caught:
        connect(listener.url, TlsTrust(fingerprint=WRONG, known_servers=tmp_path / "known"))
    listener.settle()
    err = caught.value
    assert err.seen == listener.cert.fingerprint and err.expected == WRONG
    assert err.address == f"127.0.0.1:{listener.port}"
    assert f"presented a certificate with fingerprint {listener.cert.fingerprint}" in str(err)
    assert f"--tls-fingerprint expects {WRONG}" in str(err)
    assert "Nothing was sent" in str(err)
    assert listener.handshakes == 1 and bytes(listener.received) == b""  # not the upgrade, not the token
    assert not (tmp_path / "known").exists()  # a pin never writes the known servers file


def test_the_right_pin_lets_the_upgrade_request_with_the_token_go(listener: Listener, tmp_path) -> None:
    with pytest.raises(WireError) as caught:  # the listener never answers the upgrade
        connect(listener.url, TlsTrust(fingerprint=listener.cert.fingerprint))
    assert not isinstance(caught.value, UntrustedCertificate)
    assert b"GET /v1/split HTTP/1.1" in listener.received and b"Bearer s3cret" in listener.received


def test_first_use_pins_then_a_changed_certificate_is_refused(tmp_path) -> None:
    known = tmp_path / "known_servers"
    notices: list[str] = []
    trust = TlsTrust(known_servers=known, notify=notices.append)
    with tls_listener(self_signed(tmp_path / "a")) as first:
        with pytest.raises(WireError):  # trusted on first use (then the listener does not answer)
            connect(first.url, trust, timeout=5.0)  # first use shakes hands twice: room for a loaded machine
        assert b"Bearer s3cret" in first.received
        address = server_address("127.0.0.1", first.port)
        entry = KnownServers(known).get(address)
        assert entry is not None and entry.fingerprint == first.cert.fingerprint
        assert len(notices) == 1 and f"trusting {address} on first use" in notices[0]
        assert first.cert.fingerprint in notices[0] and str(known) in notices[0]
        port = first.port
    # Another certificate on the same address: a new server, or someone in the middle.
    with tls_listener(self_signed(tmp_path / "b")) as second:
        store = KnownServers(known)
        store.add(server_address("127.0.0.1", second.port), first.cert.fingerprint)
        with pytest.raises(UntrustedCertificate) as caught:
            connect(second.url, trust)
        second.settle()
        message = str(caught.value)
        address = server_address("127.0.0.1", second.port)
        assert f"the certificate of {address} has CHANGED: it presents {second.cert.fingerprint}" in message
        assert f"{known} recorded {first.cert.fingerprint}" in message
        assert f"lambdasplit trust forget {address}" in message and "Nothing was sent" in message
        assert bytes(second.received) == b""
        # Accepting the change the documented way: forget, connect again, pinned anew.
        assert store.forget(address)
        with pytest.raises(WireError):
            connect(second.url, trust)
        assert store.get(address).fingerprint == second.cert.fingerprint
    assert port  # the first listener's address kept its own entry
    assert KnownServers(known).get(server_address("127.0.0.1", port)) is not None


def test_without_first_use_an_unknown_self_signed_server_is_refused_with_its_fingerprint(listener, tmp_path) -> None:
    with pytest.raises(UntrustedCertificate) as caught:
        connect(listener.url, TlsTrust(tofu=False, known_servers=tmp_path / "k"))
    listener.settle()
    message = str(caught.value)
    assert "not signed by a CA this machine trusts" in message
    assert f"--tls-fingerprint {listener.cert.fingerprint}" in message and "--tls-ca" in message
    assert b"Bearer" not in listener.received


def test_a_ca_that_did_not_sign_it_is_refused_naming_both(listener, tmp_path) -> None:
    other = self_signed(tmp_path / "other-ca")
    with pytest.raises(UntrustedCertificate) as caught:
        connect(listener.url, TlsTrust(ca_file=other.cert))
    listener.settle()
    message = str(caught.value)
    assert f"does not verify against --tls-ca {other.cert}" in message
    assert f"--tls-fingerprint {listener.cert.fingerprint}" in message
    assert b"Bearer" not in listener.received
    with pytest.raises(WireError) as ok:  # its own certificate as the CA: verified, the upgrade goes out
        connect(listener.url, TlsTrust(ca_file=listener.cert.cert))
    assert not isinstance(ok.value, UntrustedCertificate) and b"Bearer s3cret" in listener.received


def test_a_refused_certificate_is_not_failed_over_or_retried(listener, tmp_path) -> None:
    with pytest.raises(UntrustedCertificate):
        CloudClient([listener.url, "ws://127.0.0.1:9/v1/split"], trust=TlsTrust(fingerprint=WRONG), timeout=1.5)
    listener.settle()
    assert listener.handshakes == 1


@pytest.mark.parametrize("host", ["body.invalid", "10.77.0.2", "[2001:db8::1]", "0.0.0.0"])
def test_the_token_never_goes_over_plain_ws_beyond_loopback(host: str) -> None:
    # Refused before any connection is attempted (so no packet leaves for these addresses).
    with pytest.raises(ConfigError, match=r"refusing to send the bearer token over plain ws:// to .*--insecure"):
        CloudClient(f"ws://{host}:8765/v1/split", token="s3cret", timeout=1)


def test_insecure_lets_the_token_go_over_plain_ws() -> None:
    # It tries (and fails to connect: a .invalid name never resolves, RFC 6761).
    with pytest.raises(WireError, match="cannot reach"):
        CloudClient("ws://body.invalid:8765/v1/split", token="s3cret", trust=TlsTrust(insecure=True), timeout=0.5)


def test_plain_ws_without_a_token_beyond_loopback_is_allowed_but_said() -> None:
    notices: list[str] = []
    with pytest.raises(WireError, match="cannot reach"):
        CloudClient("ws://body.invalid:8765/v1/split", trust=TlsTrust(notify=notices.append), timeout=0.5)
    assert len(notices) == 1 and "travel in the clear" in notices[0] and "docs/threat-model.md" in notices[0]


def test_trust_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        TlsTrust(fingerprint=WRONG, ca_file=tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        TlsTrust(ca_file=tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="not a certificate fingerprint"):
        TlsTrust(fingerprint="SHA256:short")
    hexed = "ab" * 32
    assert TlsTrust(fingerprint=hexed).fingerprint.startswith("SHA256:")


def test_known_servers_file_round_trips_and_names_a_bad_line(tmp_path) -> None:
    store = KnownServers(tmp_path / "ks")
    assert store.entries() == [] and store.get("a:1") is None and not store.forget("a:1")
    store.add("a:1", WRONG)
    store.add(server_address("::1", 8765), WRONG)
    assert [e.address for e in store.entries()] == ["a:1", "[::1]:8765"]
    store.add("a:1", "SHA256:" + "B" * 42 + "E")  # replaces, keeps one line per server
    assert len(store.entries()) == 2 and store.get("a:1").fingerprint.startswith("SHA256:BBB")
    assert (tmp_path / "ks").read_text().startswith("# lambdasplit known servers")
    (tmp_path / "ks").write_text("onlyonefield\n")
    with pytest.raises(ConfigError, match=r"ks:1: expected HOST:PORT FINGERPRINT"):
        store.entries()

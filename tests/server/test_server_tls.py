"""TLS over loopback with real body servers: the secure default, pins, CAs, first use, and a packet capture.

Beyond loopback `serve` encrypts unless told `--insecure`; `--tls` forces that on loopback, which is how these
tests get a TLS server on 127.0.0.1. (Known servers and the servers' own certificates live in the test session's
LAMBDASPLIT_STATE: see conftest.py.)
"""

from __future__ import annotations

import socket
import stat
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lambdasplit.bench.capture import capture, capture_unavailable, pcap_payloads
from lambdasplit.cli.app import app
from lambdasplit.client import CloudClient, connect_device
from lambdasplit.errors import UntrustedCertificate, WireError
from lambdasplit.generation import generate
from lambdasplit.server.process import lambdasplit_process
from lambdasplit.server.run import READY
from lambdasplit.split import load_split
from lambdasplit.tls import KnownServers, TlsTrust, certificate_fingerprint, server_address
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
PROMPT = [1, 5, 9, 200]
WRONG = "SHA256:" + "A" * 42 + "E"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def expected(tiny) -> list[int]:
    return generate(load_split(tiny, LAYERS), PROMPT, max_new_tokens=8, ignore_eos=True).token_ids


@contextmanager
def serving(tiny: Path, *args: str, token: str | None = None) -> Iterator[tuple[str, str | None]]:
    """(URL, fingerprint on the ready line or None) of `lambdasplit serve ARGS` on the tiny model."""
    argv = ["serve", "--model", str(tiny), "--layers", LAYERS, *args]
    if "--port" not in args:
        argv += ["--port", "0"]
    with lambdasplit_process(argv, READY, token=token, timeout=120) as ready:
        url, *rest = ready.split()
        yield url, (rest[0] if rest else None)


def run_split(url: str, tiny: Path, **kwargs) -> list[int]:
    split, client = connect_device(url, tiny, **kwargs)
    with client:
        return generate(split, PROMPT, max_new_tokens=8, ignore_eos=True, link=client.open_session("float32")).token_ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_beyond_loopback_the_default_is_tls_on_a_certificate_made_once(tiny, expected, tmp_path) -> None:
    tls_dir = tmp_path / "server-tls"
    with serving(tiny, "--host", "0.0.0.0", "--tls-dir", str(tls_dir), token="t0k") as (url, printed):
        assert url.startswith("wss://0.0.0.0:")
        cert = tls_dir / "cert.pem"
        assert printed == certificate_fingerprint(cert)  # the ready line pins it: URL, then fingerprint
        for path in (cert, tls_dir / "key.pem"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        device_url = url.replace("0.0.0.0", "127.0.0.1")
        notices: list[str] = []
        known = tmp_path / "known_servers"
        first_use = TlsTrust(known_servers=known, notify=notices.append)
        assert run_split(device_url, tiny, token="t0k", trust=first_use) == expected
        address = server_address("127.0.0.1", int(device_url.split(":")[2].split("/")[0]))
        assert KnownServers(known).get(address).fingerprint == printed
        assert len(notices) == 1 and printed in notices[0]
        assert run_split(device_url, tiny, token="t0k", trust=first_use) == expected  # pinned now: no notice
        assert len(notices) == 1
        assert run_split(device_url, tiny, token="t0k", trust=TlsTrust(fingerprint=printed)) == expected
        assert run_split(device_url, tiny, token="t0k", trust=TlsTrust(ca_file=cert)) == expected
        with pytest.raises(UntrustedCertificate, match=f"expects {WRONG}"):
            connect_device(device_url, tiny, token="t0k", trust=TlsTrust(fingerprint=WRONG))
        with pytest.raises(WireError):  # plain ws:// to the TLS port gets nowhere
            CloudClient(device_url.replace("wss://", "ws://"), timeout=5)
    # A restart reuses the certificate, so the pins hold.
    with serving(tiny, "--host", "0.0.0.0", "--tls-dir", str(tls_dir), token="t0k") as (url, again):
        assert again == printed


def test_a_changed_certificate_is_refused_and_accepted_after_forget(tiny, expected, tmp_path) -> None:
    port = free_port()
    url = f"wss://127.0.0.1:{port}/v1/split"
    address = f"127.0.0.1:{port}"
    known = tmp_path / "known_servers"
    trust = TlsTrust(known_servers=known, notify=lambda _: None)
    with serving(tiny, "--tls", "--port", str(port), "--tls-dir", str(tmp_path / "a")) as (_, first):
        assert run_split(url, tiny, trust=trust) == expected  # first use pins it
    with serving(tiny, "--tls", "--port", str(port), "--tls-dir", str(tmp_path / "b")) as (_, second):
        assert second != first
        with pytest.raises(UntrustedCertificate) as caught:
            connect_device(url, tiny, trust=trust)
        # The documented message (docs/protocol.md, "Trusting a server"): what happened, both fingerprints,
        # and the two ways to accept a legitimate change.
        message = str(caught.value)
        assert f"the certificate of {address} has CHANGED: it presents {second}" in message
        assert f"{known} recorded {first}" in message and "Nothing was sent to it" in message
        assert f"`lambdasplit trust forget {address}`" in message and f"--tls-fingerprint {second}" in message
        result = CliRunner().invoke(app, ["trust", "forget", address, "--known-servers", str(known)])
        assert result.exit_code == 0, result.output
        assert run_split(url, tiny, trust=trust) == expected
        assert KnownServers(known).get(address).fingerprint == second
        listed = CliRunner().invoke(app, ["trust", "list", "--known-servers", str(known)])
        assert address in listed.output and second in listed.output


def test_own_certificate_and_a_device_that_trusts_its_ca(tiny, expected, tmp_path) -> None:
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key, "-out", crt,
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with serving(tiny, "--tls-cert", str(crt), "--tls-key", str(key)) as (url, printed):
        assert url.startswith("wss://127.0.0.1") and printed == certificate_fingerprint(crt)
        with pytest.raises(UntrustedCertificate, match="not signed by a CA this machine trusts"):
            CloudClient(url, trust=TlsTrust(tofu=False))
        assert run_split(url, tiny, trust=TlsTrust(ca_file=crt)) == expected
        with pytest.warns(DeprecationWarning, match="ca_file= is deprecated"):
            assert run_split(url, tiny, ca_file=str(crt)) == expected
        fingerprint = CliRunner().invoke(app, ["trust", "fingerprint", str(crt)])
        assert fingerprint.output.strip() == printed


def test_every_command_that_takes_cloud_takes_the_trust_options(tiny, tmp_path) -> None:
    """generate, chat, up and imagine refuse a wrong pin with the error that names both fingerprints."""
    with serving(tiny, "--tls", "--tls-dir", str(tmp_path)) as (url, printed):
        commands = {
            "generate": ["generate", "hi", "--model", str(tiny), "--cloud", url],
            "chat": ["chat", "--model", str(tiny), "--cloud", url],
            "up": ["up", "--model", str(tiny), "--cloud", url, "--port", "0"],
            "imagine": ["imagine", "a red circle", "--cloud", url, "--out", str(tmp_path / "x.png")],
        }
        for name, argv in commands.items():
            result = CliRunner().invoke(app, [*argv, "--tls-fingerprint", WRONG])
            assert result.exit_code != 0, name
            assert isinstance(result.exception, UntrustedCertificate), (name, result.exception)
            assert printed in str(result.exception) and WRONG in str(result.exception), name
        ok = CliRunner().invoke(app, [*commands["generate"], "-n", "3", "--json", "--tls-fingerprint", printed])
        assert ok.exit_code == 0, ok.output


def tls_records(stream: bytes) -> list[int]:
    """The content types of the TLS records ``stream`` consists of; AssertionError if it is anything else."""
    types, at = [], 0
    while at < len(stream):
        assert at + 5 <= len(stream), f"a partial record header at byte {at}"
        kind, major, minor, length = struct.unpack_from(">BBBH", stream, at)
        assert kind in (20, 21, 22, 23), f"not a TLS record at byte {at}: content type {kind}"
        assert (major, minor) in ((3, 1), (3, 3)) and length <= (1 << 14) + 256, (major, minor, length)
        types.append(kind)
        at += 5 + length
    return types


@pytest.mark.skipif(capture_unavailable() is not None, reason=f"no capture: {capture_unavailable()}")
def test_a_default_deployment_beyond_loopback_carries_only_tls_records(tiny, tmp_path) -> None:
    """tcpdump on lo, whole packets. The control: `serve` on loopback (plain by default) shows the RESULT
    headers and the handshake's JSON in the clear. The default beyond loopback (`--host 0.0.0.0`, no TLS
    option, a token) carries TLS records and nothing else, both ways: no frame, no JSON, no token, no URL."""
    result_header = b"\xce\x9b\x01\x06"  # magic, version 1, RESULT
    seen = {}
    for name, args in (("loopback", []), ("default", ["--host", "0.0.0.0"])):
        with serving(tiny, *args, token="s3cret-token") as (url, _):
            url = url.replace("0.0.0.0", "127.0.0.1")
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            pcap = tmp_path / f"{name}.pcap"
            with capture("lo", port, pcap, snaplen=0):
                split, client = connect_device(url, tiny, token="s3cret-token", trust=TlsTrust(notify=lambda _: None))
                with client:
                    generate(split, PROMPT, max_new_tokens=8, ignore_eos=True, link=client.open_session())
            up, down = pcap_payloads(pcap, port)
            assert len(up) > 2000 and len(down) > 2000
            seen[name] = (url, up, down)
    url, up, down = seen["loopback"]
    assert url.startswith("ws://") and down.count(result_header) >= 8 and b'"fingerprint"' in down
    url, up, down = seen["default"]
    assert url.startswith("wss://")
    for wire in (up, down):
        types = tls_records(wire)  # the whole stream, record by record
        assert types[0] == 22 and 23 in types  # a handshake first, then application data
        assert result_header not in wire and b"\xce\x9b\x01\x05" not in wire
        assert b'"fingerprint"' not in wire and b'"protocol"' not in wire
        assert b"s3cret-token" not in wire and b"Bearer" not in wire and b"/v1/split" not in wire

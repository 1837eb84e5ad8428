"""TLS: `serve --tls-cert/--tls-key` serves wss://; a client trusting the certificate connects and generates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lambdasplit.bench.capture import capture, capture_unavailable, pcap_payloads
from lambdasplit.client import CloudClient, connect_device
from lambdasplit.errors import WireError
from lambdasplit.generation import generate
from lambdasplit.split import load_split
from servers import body_server
from tiny_models import NUM_LAYERS


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key, "-out", crt,
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


def test_tls_server_serves_wss_and_output_is_exact(tiny_checkpoint, cert) -> None:
    path, _ = tiny_checkpoint("llama")
    crt, key = cert
    layers = f"1:{NUM_LAYERS - 1}"
    with body_server("--model", str(path), "--layers", layers, "--tls-cert", str(crt), "--tls-key", str(key)) as url:
        assert url.startswith("wss://")
        with pytest.raises(WireError):  # a client that does not trust the certificate refuses to talk
            CloudClient(url)
        with pytest.raises(WireError):  # and plain ws:// to a TLS port gets nowhere
            CloudClient(url.replace("wss://", "ws://"), timeout=5)
        split, client = connect_device(url, path, ca_file=str(crt))
        with client:
            got = generate(
                split, [1, 5, 9, 200], max_new_tokens=10, ignore_eos=True, link=client.open_session("float32")
            )
    expected = generate(load_split(path, layers), [1, 5, 9, 200], max_new_tokens=10, ignore_eos=True)
    assert got.token_ids == expected.token_ids


@pytest.mark.skipif(capture_unavailable() is not None, reason=f"no capture: {capture_unavailable()}")
def test_with_tls_a_loopback_capture_shows_no_frame_headers_or_text(tiny_checkpoint, cert, tmp_path) -> None:
    """tcpdump on lo, whole packets: with ws:// the server's RESULT headers cross in the clear (the control),
    with wss:// nothing of the protocol does."""
    path, _ = tiny_checkpoint("llama")
    crt, key = cert
    layers = f"1:{NUM_LAYERS - 1}"
    result_header = b"\xce\x9b\x01\x06"  # magic, version 1, RESULT
    seen = {}
    for scheme, tls in (("ws", []), ("wss", ["--tls-cert", str(crt), "--tls-key", str(key)])):
        with body_server("--model", str(path), "--layers", layers, *tls) as url:
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            pcap = tmp_path / f"{scheme}.pcap"
            with capture("lo", port, pcap, snaplen=0):
                split, client = connect_device(url, path, ca_file=str(crt) if tls else None)
                with client:
                    generate(split, [1, 5, 9, 200], max_new_tokens=8, ignore_eos=True, link=client.open_session())
            up, down = pcap_payloads(pcap, port)
            assert len(up) > 2000 and len(down) > 2000
            seen[scheme] = (up, down)
    up, down = seen["ws"]
    assert down.count(result_header) >= 8 and b'"fingerprint"' in down  # without TLS: frames in the clear
    up, down = seen["wss"]
    for wire in (up, down):
        assert result_header not in wire and b"\xce\x9b\x01\x05" not in wire
        assert b'"fingerprint"' not in wire and b'"protocol"' not in wire and b"Bearer" not in wire
        assert b"/v1/split" not in wire  # not even the WebSocket upgrade request

"""The server's self-signed certificate: made once, private, reused, usable as its own CA."""

from __future__ import annotations

import contextlib
import ssl
import stat

import pytest
from cryptography import x509

from lambdasplit.errors import ConfigError
from lambdasplit.tls import self_signed, state_dir
from lambdasplit.tls.certificate import VALID_YEARS, default_names


def test_made_once_private_and_reused(tmp_path) -> None:
    folder = tmp_path / "tls"
    first = self_signed(folder, ["body.example", "10.0.0.5"])
    assert first.created
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (first.cert, first.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    again = self_signed(folder)
    assert not again.created and again.fingerprint == first.fingerprint  # a restart keeps the pinned certificate
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["body.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert VALID_YEARS - 0.1 < years < VALID_YEARS + 0.1


def test_it_verifies_as_its_own_ca_for_its_names(tmp_path) -> None:
    cert = self_signed(tmp_path, default_names("127.0.0.1"))
    context = ssl.create_default_context(cafile=str(cert.cert))  # what --tls-ca does
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert.cert, cert.key)
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    c = context.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    s = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):  # drive the handshake in memory
        for obj in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    assert c.getpeercert()["subjectAltName"]  # verified: chain and host name


def test_a_half_missing_or_exposed_certificate_is_refused_with_the_fix(tmp_path) -> None:
    cert = self_signed(tmp_path)
    cert.cert.unlink()
    with pytest.raises(ConfigError, match=r"cert.pem is missing beside .*key.pem.*delete the folder"):
        self_signed(tmp_path)
    other = self_signed(tmp_path / "b")
    other.key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by other users: `chmod 600"):
        self_signed(tmp_path / "b")


def test_state_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LAMBDASPLIT_STATE", str(tmp_path / "s"))
    assert state_dir() == tmp_path / "s"
    monkeypatch.delenv("LAMBDASPLIT_STATE")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "lambdasplit"

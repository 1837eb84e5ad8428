"""Fingerprints: one canonical form, the forms people paste accepted, anything else refused with the forms."""

from __future__ import annotations

import hashlib
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lambdasplit.errors import ConfigError
from lambdasplit.tls import certificate_fingerprint, fingerprint, is_loopback, parse_fingerprint, self_signed


def test_fingerprint_is_sha256_of_the_der_certificate_like_ssh_writes_it(tmp_path) -> None:
    cert = self_signed(tmp_path)
    der = ssl.PEM_cert_to_DER_cert(cert.cert.read_text())
    fp = certificate_fingerprint(cert.cert)
    assert fp == fingerprint(der) == cert.fingerprint
    assert fp.startswith("SHA256:") and len(fp) == 7 + 43 and "=" not in fp
    # openssl x509 -noout -fingerprint -sha256 prints the same digest as colon-separated hex
    hexed = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert parse_fingerprint(f"sha256 Fingerprint={hexed}") == fp
    assert parse_fingerprint(hexed.replace(":", "").lower()) == fp


@given(st.binary(min_size=32, max_size=32))
def test_parse_fingerprint_round_trips(digest: bytes) -> None:
    import base64

    canonical = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert parse_fingerprint(canonical) == canonical
    assert parse_fingerprint(f"  {canonical}\n") == canonical
    assert parse_fingerprint(digest.hex()) == canonical


@pytest.mark.parametrize(
    "bad", ["", "SHA256:", "SHA256:abc", "MD5:" + "A" * 43, "ab" * 31, "zz" * 32, "SHA256:" + "!" * 43]
)
def test_a_malformed_fingerprint_is_refused_naming_the_forms_allowed(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"not a certificate fingerprint.*SHA256:<43 base64"):
        parse_fingerprint(bad)


def test_certificate_fingerprint_of_a_file_without_a_certificate_names_it(tmp_path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"key\.pem holds no PEM certificate"):
        certificate_fingerprint(path)
    with pytest.raises(ConfigError, match="cannot read the certificate"):
        certificate_fingerprint(tmp_path / "missing.pem")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.77.0.2", False),
        ("body.example", False),
        ("127.0.0.1.example", False),  # a DNS name, whatever it resolves to
    ],
)
def test_is_loopback_counts_only_literal_loopback_names(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback

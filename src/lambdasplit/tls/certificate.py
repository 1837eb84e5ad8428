"""The body server's own certificate, for TLS without a certificate authority.

``serve`` beyond loopback encrypts by default: with no ``--tls-cert`` it uses a self-signed certificate made
once, the first time, and kept with the server's state (``state_dir()/tls``: ``cert.pem`` and ``key.pem``, both
0600 in a 0700 folder). It is reused on every start, so its fingerprint, which the server prints beside its
URL and devices pin, stays the same. Devices trust it by that fingerprint (``--tls-fingerprint``, or trust on
first use), not by a name, so the names in it only matter to a device that uses it as its CA (``--tls-ca``).

An ECDSA P-256 key: fast to make (milliseconds), and what TLS 1.3 stacks prefer.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lambdasplit.errors import ConfigError
from lambdasplit.tls.files import private_dir, state_dir, write_private
from lambdasplit.tls.fingerprints import certificate_fingerprint

#: Years a self-signed certificate stays valid: it is pinned by fingerprint, so renewal would only break pins.
VALID_YEARS = 10


@dataclass(frozen=True)
class ServerCertificate:
    """A certificate and its private key as PEM files, with the certificate's fingerprint."""

    cert: Path
    key: Path
    fingerprint: str
    created: bool = False  # made by this call (not found from an earlier start)


def default_names(host: str = "") -> list[str]:
    """Names a self-signed certificate covers: this machine's names, loopback, and ``host`` when specific."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    if host and host not in ("0.0.0.0", "::", ""):
        names.insert(0, host)
    return list(dict.fromkeys(n for n in names if n))


def self_signed(directory: Path | None = None, names: Iterable[str] = ()) -> ServerCertificate:
    """The server's self-signed certificate in ``directory`` (default ``state_dir()/tls``): made the first
    time, for ``names`` (DNS names or IP addresses; ``default_names()`` when empty), and reused after."""
    directory = directory or state_dir() / "tls"
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists() or key.exists():
        missing = [p for p in (cert, key) if not p.exists()]
        if missing:
            raise ConfigError(
                f"{missing[0]} is missing beside {({cert, key} - set(missing)).pop()}: restore it, or delete the "
                f"folder {directory} to make a new certificate (devices that pinned the old one will refuse it)"
            )
        if key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{key} is readable by other users: `chmod 600 {key}` (it is the server's private key)")
        return ServerCertificate(cert, key, certificate_fingerprint(cert))
    cert_pem, key_pem = _make(list(names) or default_names())
    private_dir(directory)
    write_private(key, key_pem)
    write_private(cert, cert_pem)
    return ServerCertificate(cert, key, certificate_fingerprint(cert), created=True)


def _make(names: list[str]) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a new self-signed certificate for ``names``."""
    # cryptography is imported here, not at module load: only a server that makes a certificate needs it.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"lambdasplit body server {names[0]}")])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate a device clock a little behind
        .not_valid_after(now + datetime.timedelta(days=365 * VALID_YEARS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        # Its own issuer: a device may name this file as its CA (--tls-ca), so it is marked as one, with the
        # key identifiers strict verifiers (Python 3.13's default context) require.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem

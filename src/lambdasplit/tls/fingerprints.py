"""Certificate fingerprints, written as SSH writes key fingerprints: ``SHA256:`` and unpadded base64.

A fingerprint is the SHA-256 of the certificate's DER bytes. Input may also be hex, with or without colons,
as ``openssl x509 -noout -fingerprint -sha256 -in cert.pem`` prints it (its ``sha256 Fingerprint=`` prefix too).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import ssl
from pathlib import Path

from lambdasplit.errors import ConfigError

PREFIX = "SHA256:"
_HEX = re.compile(r"^(?:sha256fingerprint=)?((?:[0-9a-f]{2}:?){32})$", re.IGNORECASE)


def fingerprint(der: bytes) -> str:
    """The fingerprint of a certificate given as DER bytes: ``SHA256:`` + 43 base64 characters."""
    return PREFIX + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def certificate_fingerprint(path: str | Path) -> str:
    """The fingerprint of the first certificate in a PEM file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the certificate {path}: {exc.strerror or exc}") from exc
    try:
        return fingerprint(ssl.PEM_cert_to_DER_cert(text[: text.index("-----END CERTIFICATE-----") + 25]))
    except ValueError as exc:
        raise ConfigError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE----- ...)") from exc


def parse_fingerprint(text: str) -> str:
    """``text`` written as ``SHA256:<base64>`` or as 64 hex digits (colons allowed); the canonical form back."""
    value = text.strip()
    hexed = _HEX.match(re.sub(r"\s", "", value))  # openssl: "sha256 Fingerprint=AB:CD:..."
    if hexed:
        return PREFIX + base64.b64encode(bytes.fromhex(hexed.group(1).replace(":", ""))).decode().rstrip("=")
    if value.upper().startswith(PREFIX):
        body = value[len(PREFIX) :]
        try:
            digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except binascii.Error:
            digest = b""
        if len(digest) == 32:
            return PREFIX + base64.b64encode(digest).decode().rstrip("=")
    raise ConfigError(
        f"{text!r} is not a certificate fingerprint: use SHA256:<43 base64 characters>, as `lambdasplit serve` "
        "prints it, or the 64 hex digits of `openssl x509 -noout -fingerprint -sha256 -in CERT`"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine by itself: ``localhost`` or an address in 127.0.0.0/8 or ::1.

    Only literal names count: a DNS name that resolves to 127.0.0.1 today may resolve elsewhere tomorrow.
    """
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

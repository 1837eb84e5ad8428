"""What a device trusts when it connects to ``wss://``: a pinned fingerprint, a CA, or the server it met first.

In order (the first that applies decides; nothing of the protocol, not even the token, is sent before):

1. ``fingerprint`` (``--tls-fingerprint SHA256:...``): the server's certificate must have exactly that
   fingerprint. Names and dates are not checked: the pin is the trust.
2. ``ca_file`` (``--tls-ca FILE``): ordinary verification against that CA (chain, dates, host name).
3. The known servers file (trust on first use, like SSH's ``known_hosts``): a server met before must present
   the certificate it presented then; a changed one is refused with ``UntrustedCertificate``, which says how
   to accept a legitimate change (``lambdasplit trust forget HOST:PORT``).
4. A server met for the first time: this machine's CAs (a certificate from a public CA verifies, and is not
   pinned: it may renew); failing that, its certificate is pinned in the known servers file and used
   (``notify`` says so, with the fingerprint, to compare with what ``lambdasplit serve`` printed).
"""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lambdasplit.errors import ConfigError, UntrustedCertificate
from lambdasplit.tls.files import state_dir, write_private
from lambdasplit.tls.fingerprints import fingerprint, is_loopback, parse_fingerprint

_log = logging.getLogger("lambdasplit.tls")
_HEADER = (
    "# lambdasplit known servers (trust on first use): HOST:PORT FINGERPRINT FIRST-SEEN\n"
    "# `lambdasplit trust forget HOST:PORT` removes a server, so that its next certificate is trusted anew.\n"
)


def server_address(host: str, port: int) -> str:
    """``host:port`` as the known servers file keys it (``[v6]:port`` for IPv6, names in lower case)."""
    host = host.strip("[]").lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class KnownServer:
    address: str
    fingerprint: str
    first_seen: str


class KnownServers:
    """The trust-on-first-use store: one line per server. Default file: ``state_dir()/known_servers``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "known_servers"

    def entries(self) -> list[KnownServer]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) < 2:
                raise ConfigError(f"{self.path}:{number}: expected HOST:PORT FINGERPRINT [FIRST-SEEN], got {line!r}")
            found.append(KnownServer(fields[0], parse_fingerprint(fields[1]), fields[2] if len(fields) > 2 else "?"))
        return found

    def get(self, address: str) -> KnownServer | None:
        return next((e for e in self.entries() if e.address == address), None)

    def add(self, address: str, fingerprint: str) -> KnownServer:
        """Record (or replace) ``address``'s fingerprint, seen now."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = KnownServer(address, parse_fingerprint(fingerprint), now)
        self._write([*(e for e in self.entries() if e.address != address), entry])
        return entry

    def forget(self, address: str) -> bool:
        """Remove ``address``; whether it was there."""
        entries = self.entries()
        kept = [e for e in entries if e.address != address]
        if len(kept) != len(entries):
            self._write(kept)
        return len(kept) != len(entries)

    def _write(self, entries: list[KnownServer]) -> None:
        lines = "".join(f"{e.address} {e.fingerprint} {e.first_seen}\n" for e in entries)
        write_private(self.path, (_HEADER + lines).encode())


@dataclass(frozen=True)
class TlsTrust:
    """How a device decides to trust a ``wss://`` server (see the module's docstring), and whether it may talk
    in the clear.

    ``insecure``: allow sending the bearer token over plain ``ws://`` to a host that is not loopback (for a
    deployment that terminates TLS elsewhere on a trusted path). ``notify`` receives the notices a user should
    read (a server pinned on first use, hidden states sent in the clear); default: the ``lambdasplit.tls`` logger.
    """

    fingerprint: str | None = None
    ca_file: Path | None = None
    known_servers: Path | None = None
    tofu: bool = True
    insecure: bool = False
    notify: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", parse_fingerprint(self.fingerprint))
        if self.fingerprint is not None and self.ca_file is not None:
            raise ConfigError("pass --tls-fingerprint or --tls-ca, not both: a pin already says which certificate")
        if self.ca_file is not None:
            object.__setattr__(self, "ca_file", Path(self.ca_file))
            if not self.ca_file.is_file():
                raise ConfigError(f"--tls-ca {self.ca_file}: no such file (a PEM file with the CA's certificate)")

    def store(self) -> KnownServers:
        return KnownServers(self.known_servers)

    def _notify(self, message: str) -> None:
        (self.notify or _log.warning)(message)

    # --- before connecting ------------------------------------------------------------------------------
    def check_plain(self, host: str, port: int, token: str | None) -> None:
        """Refuse to send ``token`` over plain ``ws://`` beyond loopback (unless ``insecure``); say what a
        plain connection beyond loopback exposes."""
        if is_loopback(host) or self.insecure:
            return
        address = server_address(host, port)
        if token:
            raise ConfigError(
                f"refusing to send the bearer token over plain ws:// to {address}, which is not loopback: anyone on "
                "the path would read it (and every hidden state). Connect with wss:// (`lambdasplit serve` encrypts "
                "by default beyond loopback), or pass --insecure if TLS is terminated elsewhere on a path you trust."
            )
        self._notify(
            f"hidden states to {address} travel in the clear (ws://): an eavesdropper holding the public weights read "
            "99.7-100% of prompt tokens from them in the project's audit (docs/threat-model.md). Use wss://."
        )

    # --- the TLS handshake ---------------------------------------------------------------------------------
    def context(self, host: str, port: int) -> ssl.SSLContext:
        """The context of the first attempt: a pin, the CA, a known server's pin, or this machine's CAs."""
        address = server_address(host, port)
        if self.fingerprint is not None:
            return _pinned(address, self.fingerprint, self._pin_mismatch)
        if self.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.ca_file))
        known = self.store().get(address) if self.tofu else None
        if known is not None:
            return _pinned(address, known.fingerprint, self._known_mismatch)
        return ssl.create_default_context()

    def first_use_context(self, host: str, port: int) -> ssl.SSLContext | None:
        """After this machine's CAs refused a server never met before: a context that pins whatever certificate
        it presents (trust on first use), or None when this trust does not allow that."""
        if self.fingerprint is not None or self.ca_file is not None or not self.tofu:
            return None
        address = server_address(host, port)

        def pin(seen: str) -> None:
            store = self.store()
            store.add(address, seen)
            self._notify(
                f"trusting {address} on first use: its certificate's fingerprint is {seen} (recorded in "
                f"{store.path}). Compare it with the fingerprint `lambdasplit serve` printed beside its URL; from now "
                "on a different certificate is refused."
            )

        return _checked(pin)

    def verification_failed(self, host: str, port: int, reason: ssl.SSLCertVerificationError) -> UntrustedCertificate:
        """The error for a certificate the CA (``ca_file`` or this machine's) refused, naming what was seen."""
        address = server_address(host, port)
        seen = _fetch_fingerprint(host, port)
        why = reason.verify_message or str(reason)
        if self.ca_file is not None:
            advice = (
                f"it does not verify against --tls-ca {self.ca_file} ({why}). Pass the CA that signed it, or pin the "
                f"certificate with --tls-fingerprint {seen} once its operator has confirmed that fingerprint."
            )
        else:
            advice = (
                f"it is not signed by a CA this machine trusts ({why}). Trust a lambdasplit server's own certificate "
                f"with --tls-fingerprint {seen} (as `lambdasplit serve` printed it) or --tls-ca CERT.pem."
            )
        return UntrustedCertificate(
            f"the server at {address} presented a certificate with fingerprint {seen}: {advice}",
            address=address,
            seen=seen,
        )

    def _pin_mismatch(self, address: str, seen: str, expected: str) -> UntrustedCertificate:
        return UntrustedCertificate(
            f"the server at {address} presented a certificate with fingerprint {seen}, but --tls-fingerprint expects "
            f"{expected}. Nothing was sent to it. If the server's certificate changed legitimately (its operator "
            f"confirms {seen}), pass --tls-fingerprint {seen}.",
            address=address,
            seen=seen,
            expected=expected,
        )

    def _known_mismatch(self, address: str, seen: str, expected: str) -> UntrustedCertificate:
        store = self.store()
        known = store.get(address)
        since = f" (first seen {known.first_seen})" if known else ""
        return UntrustedCertificate(
            f"the certificate of {address} has CHANGED: it presents {seen}, but {store.path} recorded {expected}"
            f"{since}. Someone may be intercepting the connection, or the server has a new certificate. Nothing was "
            f"sent to it. If its operator confirms the new fingerprint {seen} (`lambdasplit serve` prints it beside "
            f"its URL), accept it with `lambdasplit trust forget {address}` and connect again, or pass "
            f"--tls-fingerprint {seen}.",
            address=address,
            seen=seen,
            expected=expected,
        )


def _checked(check: Callable[[str], None]) -> ssl.SSLContext:
    """A client context that accepts any certificate at the TLS layer and hands its fingerprint to ``check``
    right after the handshake, before the caller can send a byte; ``check`` raises to refuse it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # a pinned certificate is trusted by its fingerprint, not by a name
    context.verify_mode = ssl.CERT_NONE

    class CheckedSocket(ssl.SSLSocket):
        # SSLContext.sslsocket_class (Python docs): wrap_socket returns this class; its handshake runs on
        # connect, so the check happens inside wrap_socket, before the WebSocket upgrade request is written.
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            der = self.getpeercert(binary_form=True)
            if der is None:
                raise ssl.SSLError("the server presented no certificate")
            check(fingerprint(der))

    context.sslsocket_class = CheckedSocket
    return context


def _pinned(address: str, expected: str, mismatch: Callable[[str, str, str], UntrustedCertificate]) -> ssl.SSLContext:
    def check(seen: str) -> None:
        if seen != expected:
            raise mismatch(address, seen, expected)

    return _checked(check)


def _fetch_fingerprint(host: str, port: int) -> str:
    """The fingerprint of the certificate ``host:port`` presents (for an error message; nothing else is sent)."""
    try:
        pem = ssl.get_server_certificate((host, port), timeout=10)
    except (OSError, ssl.SSLError):
        return "(could not be read)"
    return fingerprint(ssl.PEM_cert_to_DER_cert(pem))

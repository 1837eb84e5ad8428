"""TLS without a certificate authority: the server's own certificate, and what a device trusts.

``serve`` beyond loopback encrypts by default with a self-signed certificate (``certificate``); a device pins
a server by its certificate's fingerprint (``--tls-fingerprint``), a private CA (``--tls-ca``) or on first use
(``trust``, like SSH's ``known_hosts``). Both ends write fingerprints the same way (``fingerprints``).
"""

from lambdasplit.tls.certificate import ServerCertificate, self_signed
from lambdasplit.tls.files import state_dir
from lambdasplit.tls.fingerprints import certificate_fingerprint, fingerprint, is_loopback, parse_fingerprint
from lambdasplit.tls.trust import KnownServer, KnownServers, TlsTrust, server_address

__all__ = [
    "KnownServer",
    "KnownServers",
    "ServerCertificate",
    "TlsTrust",
    "certificate_fingerprint",
    "fingerprint",
    "is_loopback",
    "parse_fingerprint",
    "self_signed",
    "server_address",
    "state_dir",
]

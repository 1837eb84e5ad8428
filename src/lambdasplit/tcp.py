"""What the device-cloud link asks of TCP: a congestion control that sends a step's burst at once.

A split step is a request and its answer: a burst of hidden-state rows one way, a burst back, and between steps
the connection is idle while each side computes. On Linux systems that use BBR by default (the VMs this project is
measured on among them), BBR paces every burst at the delivery rate it has measured, and a connection that only
ever carries short bursts after idle periods only ever shows it a low, application-limited rate. Over an emulated
250 ms path of 1 Gbit/s (``bench.links``, request and answer of N bytes each way, 0.1 s apart, median of 10), BBR
at both ends took 268 ms for 2.4 KB, 420 ms for 12 KB and 486 ms for 24 KB (a token tree's ~10 float32 rows); cubic
at both ends 251, 251 and 252 ms: one round trip. So both ends of the body link ask for ``cubic`` (Linux's usual
default: where it already is the default, this changes nothing).

The choice must be made before the connection exists: BBR turns on the socket's own pacing when it starts on a
connection, and a socket switched to another algorithm afterwards stays paced (measured: slower than leaving BBR).
So the device sets it before ``connect`` (``connect``) and the server on its listening sockets before it announces
them (``prefer``), which accepted connections inherit. Where the kernel lacks the option or refuses the name (not
Linux; an algorithm not in ``net.ipv4.tcp_allowed_congestion_control`` for an unprivileged process), the system's
algorithm stays. ``LAMBDASPLIT_TCP_CONGESTION`` names another algorithm, or ``system`` to keep the kernel's.
"""

from __future__ import annotations

import logging
import os
import socket

#: Environment variable naming the algorithm both ends ask for ("system": the kernel's default).
ENV = "LAMBDASPLIT_TCP_CONGESTION"
#: What the body link asks for unless told otherwise (see the module's doc).
DEFAULT = "cubic"

_log = logging.getLogger(__name__)


def wanted(name: str | None = None) -> str | None:
    """The algorithm to ask for: ``name``, else ``LAMBDASPLIT_TCP_CONGESTION``, else ``DEFAULT``; None for
    "system" (or an empty name): keep the kernel's."""
    name = name if name is not None else os.environ.get(ENV, DEFAULT)
    name = name.strip()
    return None if name in ("", "system") else name


def prefer(sock: socket.socket, name: str | None = None) -> bool:
    """Ask for ``wanted(name)`` on ``sock`` (a TCP socket not yet connected, or a listening one); whether the
    kernel took it. A refusal is logged at debug level and leaves the system's algorithm."""
    algorithm = wanted(name)
    option = getattr(socket, "TCP_CONGESTION", None)
    if algorithm is None or option is None or sock.type != socket.SOCK_STREAM:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, algorithm.encode())
    except OSError as exc:
        _log.debug("TCP congestion control %r not taken (%s): the system's stays", algorithm, exc)
        return False
    return True


def algorithm(sock: socket.socket) -> str | None:
    """The congestion control ``sock`` uses (None where the kernel does not say)."""
    option = getattr(socket, "TCP_CONGESTION", None)
    if option is None:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, option, 16).split(b"\0", 1)[0].decode()
    except OSError:
        return None


def connect(host: str, port: int, timeout: float | None, name: str | None = None) -> socket.socket:
    """``socket.create_connection((host, port), timeout)``, with ``wanted(name)`` asked for before each attempt to
    connect (every address ``host`` resolves to, in order, until one answers)."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            prefer(sock, name)
            sock.connect(address)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error if error is not None else OSError(f"getaddrinfo returned nothing for {host}:{port}")

"""Emulated network links: the body server in its own network namespace, behind a paced, delayed path.

``open_link`` makes, for the duration of a ``with`` block, two namespaces: the cloud's (the server runs
there) and a relay's, joined to the device (this namespace) and to the cloud by two veth pairs. In the
relay, ``delayline`` forwards every Ethernet frame after serialising it at the link's rate and holding
it for half the round-trip time, each direction with its own rate. Packets really queue, wait and cross
four interfaces; TCP sees the real round trip and bandwidth. (``tc netem`` would do the same in the
kernel, but the kernels this project runs CI on are built without it; ``delayline`` needs only veth and
raw packet sockets.) Segmentation offloads are off, so every frame is MTU-sized as on a real link and a
capture on the device's interface shows what a real wire would carry. Everything is removed afterwards,
also on errors.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from lambdasplit.bench import delayline
from lambdasplit.errors import ConfigError
from lambdasplit.lifetime import child_environment
from lambdasplit.server.process import stop_process

_PREFIX = "lsplit"
_counter = itertools.count(1)


@dataclass(frozen=True)
class Link:
    """A link between device and cloud. ``None`` rates are unshaped; ``rtt_ms`` is added delay."""

    name: str
    up_mbit: float | None
    down_mbit: float | None
    rtt_ms: float
    description: str = ""

    @property
    def emulated(self) -> bool:
        """False only for loopback, which runs the server on 127.0.0.1 with no namespace at all."""
        return self.name != "loopback"


LINKS: dict[str, Link] = {
    "loopback": Link("loopback", None, None, 0.0, "127.0.0.1, not shaped"),
    "gigabit": Link("gigabit", 1000, 1000, 1.0, "1000/1000 Mbit/s, 1 ms RTT: the paper's LAN"),
    "5g": Link("5g", 60, 100, 30.0, "60 up/100 down Mbit/s, 30 ms RTT"),
    "wireless": Link("wireless", 10, 10, 250.0, "10/10 Mbit/s, 250 ms RTT, as STIP measured"),
}
_CUSTOM = re.compile(r"^(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)$")


def parse_link(spec: str) -> Link:
    """A name from ``LINKS`` or ``UP/DOWN/RTT`` (Mbit/s, Mbit/s, ms), e.g. ``60/100/30``."""
    if spec in LINKS:
        return LINKS[spec]
    m = _CUSTOM.match(spec.strip())
    if m is None or float(m[1]) <= 0 or float(m[2]) <= 0:
        raise ConfigError(
            f"unknown link {spec!r}: use one of {', '.join(LINKS)} "
            "or UP/DOWN/RTT in Mbit/s, Mbit/s, ms (e.g. 60/100/30)"
        )
    up, down, rtt = float(m[1]), float(m[2]), float(m[3])
    return Link(spec, up, down, rtt, f"{up:g}/{down:g} Mbit/s, {rtt:g} ms RTT")


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise ConfigError(f"`{argv[0]}` is not installed (Debian: iproute2)") from exc
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"`{' '.join(argv)}` failed: {exc.stderr.strip() or exc.returncode}") from exc
    return done.stdout


@functools.cache
def netns_unavailable() -> str | None:
    """Why links cannot be emulated here (one line), or None when they can. Tried for real once."""
    if os.geteuid() != 0:
        return "emulated links need root (network namespaces, veth pairs, raw packet sockets)"
    if shutil.which("ip") is None:
        return "`ip` is not installed (Debian: iproute2)"
    try:
        with open_link(Link("probe", 1000, 1000, 1.0), _probe=True):
            pass
    except ConfigError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class LinkEndpoints:
    """Where the two ends of an open link are."""

    link: Link
    cloud_host: str  # the server binds here and the device connects here
    device_iface: str  # the device's interface, to capture on
    cloud_netns: str | None  # the server's namespace (None on loopback)

    def cloud_command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on the cloud side of the link."""
        if self.cloud_netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.cloud_netns, *argv]


def cleanup_stale_links() -> int:
    """Remove namespaces left by benchmark processes that died without cleaning up; returns how many."""
    removed = 0
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{_PREFIX}-(\d+)-\d+r?", name)
        if m is None or _alive(int(m[1])):
            continue
        # Children of the dead benchmark (its server, its delay line) would keep the namespace and its
        # interfaces alive after the name is gone.
        with contextlib.suppress(ConfigError):
            for pid in _run("ip", "netns", "pids", name).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(ConfigError):
            _run("ip", "netns", "del", name)
            removed += 1
    return removed


_BLOCKS = 1 << 14  # the /30 blocks of 10.77.0.0/16


def _free_subnet(pid: int, n: int) -> tuple[str, str]:
    """(device, cloud) addresses of a /30 in 10.77.0.0/16 that no interface here uses yet.

    Benchmarks and tests may hold links at the same time (each process counts its links from 1); two
    interfaces with the same prefix would break both. The search starts at a point spread by pid.
    """
    used = {
        (int(a) * 256 + int(b)) // 4
        for a, b in re.findall(r"\binet 10\.77\.(\d+)\.(\d+)/", _run("ip", "-o", "-4", "addr", "show"))
    }
    start = (pid * 2654435761 + n) % _BLOCKS
    for i in range(_BLOCKS):
        block = (start + i) % _BLOCKS
        if block not in used:
            third, fourth = divmod(block * 4, 256)
            return f"10.77.{third}.{fourth + 1}", f"10.77.{third}.{fourth + 2}"
    raise ConfigError("no free /30 left in 10.77.0.0/16 for an emulated link")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def open_link(link: Link, *, _probe: bool = False) -> Iterator[LinkEndpoints]:
    """Make ``link`` for the duration of the block; yields where each side is. Loopback makes nothing.

    Topology: device (this namespace) ``dev`` <-veth-> ``relay ns`` <-veth-> ``cloud ns`` (the server).
    The relay namespace runs ``delayline``, which paces and delays every frame in each direction.
    """
    if not link.emulated:
        yield LinkEndpoints(link, "127.0.0.1", "lo", None)
        return
    if not _probe:
        if reason := netns_unavailable():
            raise ConfigError(f"cannot emulate link {link.name}: {reason}")
        cleanup_stale_links()
    n, pid = next(_counter), os.getpid()
    cloud_ns, relay_ns = f"{_PREFIX}-{pid}-{n}", f"{_PREFIX}-{pid}-{n}r"
    tag = f"{pid % 100000}x{n}"  # interface names are at most 15 characters
    dev, dev_peer, cloud_peer, cloud = f"lsd{tag}", f"lsdr{tag}", f"lscr{tag}", f"lsc{tag}"
    device_ip, cloud_ip = _free_subnet(pid, n)
    in_relay, in_cloud = ["ip", "netns", "exec", relay_ns], ["ip", "netns", "exec", cloud_ns]
    relay: subprocess.Popen[str] | None = None
    try:
        _run("ip", "netns", "add", cloud_ns)
        _run("ip", "netns", "add", relay_ns)
        _run("ip", "link", "add", dev, "mtu", "1500", "type", "veth", "peer", "name", dev_peer, "mtu", "1500")
        _run("ip", "link", "add", cloud, "mtu", "1500", "type", "veth", "peer", "name", cloud_peer, "mtu", "1500")
        _run("ip", "link", "set", dev_peer, "netns", relay_ns)
        _run("ip", "link", "set", cloud_peer, "netns", relay_ns)
        _run("ip", "link", "set", cloud, "netns", cloud_ns)
        for prefix, iface in (([], dev), (in_cloud, cloud), (in_relay, dev_peer), (in_relay, cloud_peer)):
            # MTU-sized frames, as on a real link: no GSO/TSO super-packets, no GRO merging.
            _run(*prefix, "ip", "link", "set", iface, "gso_max_segs", "1", "gro_max_size", "1500", "up")
        for prefix in (in_relay, in_cloud):
            _run(*prefix, "ip", "link", "set", "lo", "up")
        for prefix, iface in ((in_relay, dev_peer), (in_relay, cloud_peer)):
            _run(*prefix, "ip", "link", "set", iface, "promisc", "on")
        _run("ip", "addr", "add", f"{device_ip}/30", "dev", dev)
        _run(*in_cloud, "ip", "addr", "add", f"{cloud_ip}/30", "dev", cloud)
        half = link.rtt_ms / 2
        up, down = f"{link.up_mbit or 'none'}:{half:g}", f"{link.down_mbit or 'none'}:{half:g}"
        relay = subprocess.Popen(
            # Run as a script, in isolated mode: ``-m`` would import the lambdasplit package (torch with it),
            # seconds of start-up and hundreds of MB for a relay that needs only the standard library.
            [*in_relay, sys.executable, "-I", delayline.__file__, dev_peer, cloud_peer,
             "--a-to-b", up, "--b-to-a", down],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env=child_environment(),  # the relay ends with this process (lifetime.py)
        )  # fmt: skip
        line = relay.stdout.readline() if relay.stdout else ""
        if not line.startswith(delayline.READY):
            relay.kill()
            err = relay.stderr.read() if relay.stderr else ""
            raise ConfigError(f"the link's delay line did not start: {err.strip()[-500:]}")
        yield LinkEndpoints(link, cloud_ip, dev, cloud_ns)
    finally:
        if relay is not None:
            stop_process(relay, signal.SIGTERM, timeout=5)
        for ns in (cloud_ns, relay_ns):  # deleting a namespace deletes the veth ends inside it, and their peers
            with contextlib.suppress(ConfigError, subprocess.TimeoutExpired):
                _run("ip", "netns", "del", ns)
        with contextlib.suppress(ConfigError, subprocess.TimeoutExpired):
            if re.search(rf"^\d+: {dev}[@:]", _run("ip", "-o", "link", "show"), re.MULTILINE):
                _run("ip", "link", "del", dev)

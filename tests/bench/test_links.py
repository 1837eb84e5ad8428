"""Emulated links: the round trip and the rate are really there, and nothing is left behind."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lambdasplit.bench.links import (
    LINKS,
    Link,
    LinkEndpoints,
    cleanup_stale_links,
    netns_unavailable,
    open_link,
    parse_link,
)
from lambdasplit.cli.bench import _LINK_HELP
from lambdasplit.errors import ConfigError

# One connection; each request is a line "CMD N": "echo N" + N bytes is echoed, "up N" + N bytes is answered
# with b"k" once all arrived, "down N" is answered with N bytes.
SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.bind((sys.argv[1], 0)); s.listen(); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); f = c.makefile("rb")
while line := f.readline():
    cmd, n = line.split(); n = int(n)
    if cmd == b"echo": c.sendall(f.read(n))
    elif cmd == b"up": f.read(n); c.sendall(b"k")
    elif cmd == b"down": c.sendall(b"y" * n)
"""


def netns_or_skip() -> None:
    if reason := netns_unavailable():
        pytest.skip(f"link emulation unavailable here: {reason}")


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def interfaces() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


@contextlib.contextmanager
def cloud_server(ends: LinkEndpoints) -> Iterator[int]:
    """The test server on the cloud side of the link; yields its port."""
    server = subprocess.Popen(
        ends.cloud_command([sys.executable, "-c", SERVER, ends.cloud_host]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        yield int(server.stdout.readline())
    finally:
        server.kill()
        server.wait()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        assert chunk, "connection closed early"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_parse_link() -> None:
    assert parse_link("5g") is LINKS["5g"] and (LINKS["5g"].up_mbit, LINKS["5g"].down_mbit) == (60, 100)
    assert LINKS["5g"].rtt_ms == 30 and LINKS["wireless"].rtt_ms == 250 and LINKS["gigabit"].up_mbit == 1000
    custom = parse_link("20/50/40")
    assert (custom.name, custom.up_mbit, custom.down_mbit, custom.rtt_ms, custom.emulated) == (
        "20/50/40",
        20,
        50,
        40,
        True,
    )
    assert parse_link("0.5/1.5/0").rtt_ms == 0
    assert not LINKS["loopback"].emulated and all(link.emulated for name, link in LINKS.items() if name != "loopback")
    for bad in ("6g", "1/2", "0/10/5", "a/b/c", "10/10/-5", "1/2/3/4", ""):
        with pytest.raises(ConfigError, match="unknown link") as err:
            parse_link(bad)
        assert all(name in str(err.value) for name in LINKS)  # the message lists what is allowed
    for name in LINKS:  # the CLI's help text lists every preset
        assert name in _LINK_HELP


def test_link_adds_the_round_trip_and_paces_at_the_rate() -> None:
    netns_or_skip()
    with open_link(Link("t", 20, 50, 40)) as ends:
        assert ends.cloud_netns in namespaces() and ends.device_iface in interfaces()
        assert ends.cloud_command(["x"]) == ["ip", "netns", "exec", ends.cloud_netns, "x"]
        with cloud_server(ends) as port, socket.create_connection((ends.cloud_host, port), timeout=30) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(5):
                start = time.perf_counter()
                c.sendall(b"echo 4\nping")
                assert recv_exact(c, 4) == b"ping"
                rtts.append(time.perf_counter() - start)
            assert 0.040 <= min(rtts) < 1.0  # propagation alone is 2 x 20 ms

            up = 2_000_000  # at 20 Mbit/s the payload alone needs 0.8 s on the wire
            start = time.perf_counter()
            c.sendall(b"up %d\n" % up + b"x" * up)
            assert recv_exact(c, 1) == b"k"
            elapsed = time.perf_counter() - start
            assert up * 8 / 20e6 <= elapsed < 10

            down = 1_000_000  # at 50 Mbit/s: 0.16 s
            start = time.perf_counter()
            c.sendall(b"down %d\n" % down)
            recv_exact(c, down)
            elapsed = time.perf_counter() - start
            assert down * 8 / 50e6 <= elapsed < 10
    assert ends.cloud_netns not in namespaces()
    assert ends.device_iface not in interfaces()
    assert not [ns for ns in namespaces() if ns.startswith(f"lsplit-{os.getpid()}-")]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_link_is_removed_when_the_block_raises(error: type[BaseException]) -> None:
    netns_or_skip()
    with pytest.raises(error), open_link(parse_link("100/100/2")) as ends:
        assert ends.cloud_netns in namespaces()
        raise error("boom")
    assert ends.cloud_netns not in namespaces()
    assert ends.device_iface not in interfaces()
    assert not [ns for ns in namespaces() if ns.startswith(f"lsplit-{os.getpid()}-")]


def test_loopback_makes_nothing() -> None:
    before = namespaces(), interfaces()
    with open_link(LINKS["loopback"]) as ends:
        assert (ends.cloud_host, ends.device_iface, ends.cloud_netns) == ("127.0.0.1", "lo", None)
        assert ends.cloud_command(["x", "y"]) == ["x", "y"]
    assert (namespaces(), interfaces()) == before


def test_stale_links_of_dead_processes_are_removed() -> None:
    netns_or_skip()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, ours = f"lsplit-{gone.pid}-1", f"lsplit-{os.getpid()}-999999"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    subprocess.run(["ip", "netns", "add", ours], check=True)
    # An orphan left inside the stale namespace (as a dead benchmark's server would be) is stopped too.
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while (
            str(orphan.pid) not in subprocess.run(["ip", "netns", "pids", stale], capture_output=True, text=True).stdout
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert cleanup_stale_links() >= 1
        assert orphan.wait(timeout=5) != 0
        assert stale not in namespaces()
        assert ours in namespaces()  # this process is alive: its namespaces stay
    finally:
        orphan.kill()
        orphan.wait()
        for ns in (stale, ours):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

"""Emulated links: the delay line really adds the round trip and paces at the rate; nothing is left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from lambdasplit.bench.capture import capture, capture_unavailable, pcap_bytes, server_socket_bytes
from lambdasplit.bench.links import LINKS, Link, netns_unavailable, open_link, parse_link
from lambdasplit.cli.bench import _LINK_HELP
from lambdasplit.errors import ConfigError

# Echoes what it receives; after the client half-closes, sends DOWN bytes, then waits for the client to close.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9100)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(65536)
    if not d or d == b"done":
        break
    c.sendall(d)
c.sendall(b"y" * int(sys.argv[2])); c.recv(1)
"""


def netns_or_skip() -> None:
    if reason := netns_unavailable():
        pytest.skip(f"link emulation unavailable here: {reason}")


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_parse_link() -> None:
    assert parse_link("5g") is LINKS["5g"] and LINKS["5g"].up_mbit == 60 and LINKS["5g"].rtt_ms == 30
    custom = parse_link("20/50/40")
    assert (custom.up_mbit, custom.down_mbit, custom.rtt_ms, custom.emulated) == (20, 50, 40, True)
    assert not LINKS["loopback"].emulated
    for bad in ("6g", "1/2", "0/10/5", "a/b/c", ""):
        with pytest.raises(ConfigError, match="unknown link"):
            parse_link(bad)
    for name in LINKS:  # the CLI's help text lists every preset
        assert name in _LINK_HELP


def test_delay_line_adds_the_round_trip_and_paces_at_the_rate() -> None:
    netns_or_skip()
    down_bytes = 1_000_000
    with open_link(Link("t", 20, 50, 40)) as ends:
        assert ends.cloud_netns in namespaces()
        server = subprocess.Popen(
            ends.cloud_command([sys.executable, "-c", SERVER, ends.cloud_host, str(down_bytes)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            c = socket.create_connection((ends.cloud_host, 9100), timeout=20)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(5):
                start = time.perf_counter()
                c.sendall(b"ping")
                assert c.recv(16) == b"ping"
                rtts.append(time.perf_counter() - start)
            assert min(rtts) >= 0.040  # propagation alone is 2 x 20 ms
            time.sleep(0.3)  # the last echo's ACK crosses the link (sent bytes count once acknowledged)
            assert server_socket_bytes(9100, ends.cloud_netns) == (20, 20)  # counted by the server's kernel
            c.sendall(b"done")
            start, got = time.perf_counter(), 0
            while got < down_bytes:
                got += len(c.recv(65536))
            elapsed = time.perf_counter() - start
            # 1 MB at 50 Mbit/s needs >= 0.16 s of serialisation, whatever TCP does.
            assert elapsed >= down_bytes * 8 / 50e6
            c.close()
        finally:
            server.kill()
    assert ends.cloud_netns not in namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert ends.device_iface not in links


def test_link_is_removed_when_the_block_raises() -> None:
    netns_or_skip()
    with pytest.raises(RuntimeError), open_link(parse_link("100/100/2")) as ends:
        raise RuntimeError("boom")
    assert ends.cloud_netns not in namespaces()


def test_loopback_makes_nothing() -> None:
    before = namespaces()
    with open_link(LINKS["loopback"]) as ends:
        assert (ends.cloud_host, ends.device_iface, ends.cloud_netns) == ("127.0.0.1", "lo", None)
        assert ends.cloud_command(["x"]) == ["x"]
    assert namespaces() == before


def test_capture_counts_mtu_sized_ip_packets(tmp_path) -> None:
    netns_or_skip()
    if reason := capture_unavailable():
        pytest.skip(reason)
    up = 300_000
    with open_link(parse_link("200/200/2")) as ends:
        server = subprocess.Popen(
            ends.cloud_command([sys.executable, "-c", SERVER, ends.cloud_host, "0"]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            with capture(ends.device_iface, 9100, tmp_path / "t.pcap") as pcap:
                c = socket.create_connection((ends.cloud_host, 9100), timeout=20)
                c.sendall(b"x" * up)
                got = 0
                while got < up:  # the echo
                    got += len(c.recv(65536))
                c.sendall(b"done")
                c.close()
                time.sleep(0.2)
        finally:
            server.kill()
    ip = pcap_bytes(pcap, 9100)
    assert ip.packets_up >= up / 1500 and ip.packets_down >= up / 1500  # MTU-sized segments, no super-packets
    # Payload plus 40-52 bytes of IP and TCP header per packet (pure ACKs are headers only).
    assert up + 4 < ip.up <= up + 4 + 80 * ip.packets_up
    assert up < ip.down <= up + 80 * ip.packets_down

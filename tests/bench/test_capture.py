"""Traffic counted outside the program: the server's kernel counters (ss) and a tcpdump capture."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from test_links import cloud_server, netns_or_skip, recv_exact

from lambdasplit.bench.capture import IpBytes, capture, capture_unavailable, pcap_bytes, server_socket_bytes
from lambdasplit.bench.links import LINKS, LinkEndpoints, open_link, parse_link
from lambdasplit.errors import ConfigError

UP, DOWN = 300_000, 400_000


def capture_or_skip() -> None:
    if reason := capture_unavailable():
        pytest.skip(reason)


def exchange(ends: LinkEndpoints, iface: str, pcap: Path) -> tuple[int, int, tuple[int, int] | None, int]:
    """Send UP bytes and receive DOWN bytes over one connection while capturing on ``iface``.

    Returns (payload sent by the client, payload sent by the server, the server's counters read before
    the connection closed, the server's port).
    """
    with cloud_server(ends) as port:
        with capture(iface, port, pcap), socket.create_connection((ends.cloud_host, port), timeout=30) as c:
            requests = [b"up %d\n" % UP + b"x" * UP, b"down %d\n" % DOWN]
            c.sendall(requests[0])
            assert recv_exact(c, 1) == b"k"
            c.sendall(requests[1])
            recv_exact(c, DOWN)
            up, down = sum(map(len, requests)), 1 + DOWN
            # The server's sent bytes count once the client's last ACK is back (a delayed ACK, then the link).
            deadline, counted = time.monotonic() + 5, None
            while time.monotonic() < deadline:
                counted = server_socket_bytes(port, ends.cloud_netns)
                if counted == (down, up):
                    break
                time.sleep(0.05)
        time.sleep(0.1)  # the FIN exchange, before tcpdump stops
    return up, down, counted, port


def check_ip_bytes(ip: IpBytes, up: int, down: int) -> None:
    # Payload plus 40-80 bytes of IP and TCP headers per packet (pure ACKs, SYN and FIN are headers only).
    assert up + 40 * ip.packets_up <= ip.up <= up + 80 * ip.packets_up
    assert down + 40 * ip.packets_down <= ip.down <= down + 80 * ip.packets_down


def test_capture_on_an_emulated_link_sees_mtu_sized_ip_packets(tmp_path: Path) -> None:
    netns_or_skip()
    capture_or_skip()
    with open_link(parse_link("100/100/4")) as ends:
        up, down, counted, port = exchange(ends, ends.device_iface, tmp_path / "link.pcap")
    assert counted == (down, up)  # the server's kernel: (sent and acknowledged, received), payload only
    ip = pcap_bytes(tmp_path / "link.pcap", port)
    check_ip_bytes(ip, up, down)
    # Segments as a real 1500-byte-MTU link carries them, not 64 KB offload super-packets.
    assert ip.packets_up >= up / 1500 and ip.packets_down >= down / 1500
    assert ip.down <= 1500 * ip.packets_down


@pytest.mark.parametrize(("host", "iface"), [("127.0.0.1", "lo"), ("::1", "lo"), ("127.0.0.1", "any")])
def test_capture_on_loopback(tmp_path: Path, host: str, iface: str) -> None:
    """IPv4 and IPv6 over Ethernet framing (lo), and Linux cooked v2 framing (``-i any``)."""
    capture_or_skip()
    with open_link(LINKS["loopback"]) as loopback:
        ends = LinkEndpoints(loopback.link, host, loopback.device_iface, None)
        up, down, counted, port = exchange(ends, iface, tmp_path / "lo.pcap")
    assert counted == (down, up)
    ip = pcap_bytes(tmp_path / "lo.pcap", port)
    check_ip_bytes(ip, up, down)
    if host == "::1":  # IPv6 headers are 20 bytes longer
        assert ip.up >= up + 60 * ip.packets_up


def test_capture_fails_clearly(tmp_path: Path) -> None:
    capture_or_skip()
    start = time.monotonic()
    with (
        pytest.raises(ConfigError, match="tcpdump did not start on nosuchiface0"),
        capture("nosuchiface0", 9, tmp_path / "x.pcap"),
    ):
        pass
    assert time.monotonic() - start < 10  # tcpdump's exit is noticed, not waited out


def test_server_socket_bytes_without_a_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert server_socket_bytes(s.getsockname()[1]) is None  # listening, but nothing established


def ipv4_tcp(size: int, sport: int, dport: int) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 6, 0, bytes(4), bytes(4)) + struct.pack(
        "!HH", sport, dport
    )


def ipv6(payload_size: int, next_header: int, sport: int, dport: int) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, payload_size, next_header, 64, bytes(16), bytes(16)) + struct.pack(
        "!HH", sport, dport
    )


def write_pcap(
    path: Path, linktype: int, frames: list[tuple[bytes, int]], endian: str = "<", nanos: bool = False
) -> None:
    """A classic pcap file whose records hold ``frames`` as (snapped bytes, original frame length)."""
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = struct.pack(f"{endian}IHHiIII", magic, 2, 4, 0, 0, 96, linktype)
    for data, length in frames:
        out += struct.pack(f"{endian}IIII", 0, 0, len(data), length) + data
    path.write_bytes(out)


def test_pcap_bytes_reads_each_framing(tmp_path: Path) -> None:
    """Lengths come from the IP headers, so snapped records count in full; other traffic is not counted."""
    eth = bytes(12)
    sll = bytes(14)  # packet type, ARPHRD, address length, address: then the protocol
    cases = {
        "ethernet": (1, lambda proto, ip: eth + struct.pack("!H", proto) + ip),
        "vlan": (1, lambda proto, ip: eth + struct.pack("!HHH", 0x8100, 5, proto) + ip),
        "sll": (113, lambda proto, ip: sll + struct.pack("!H", proto) + ip),
        "sll2": (276, lambda proto, ip: struct.pack("!H", proto) + bytes(18) + ip),
        "raw": (101, lambda proto, ip: ip),
    }
    for name, (linktype, frame) in cases.items():
        frames = [
            (frame(0x0800, ipv4_tcp(1500, 50000, 7000)), 1514),  # up, snapped: counted at 1500
            (frame(0x0800, ipv4_tcp(52, 7000, 50000)), 66),  # down
            (frame(0x86DD, ipv6(32, 6, 50001, 7000)), 86),  # up over IPv6: 40 + 32
            (frame(0x86DD, ipv6(1000, 17, 50001, 7000)), 1054),  # UDP: not counted
            (frame(0x0800, ipv4_tcp(60, 1, 2)), 74),  # another connection
            (frame(0x0806, bytes(28)), 42),  # ARP
        ]
        for endian, nanos in (("<", False), (">", True)):
            path = tmp_path / f"{name}{endian == '>'}.pcap"
            write_pcap(path, linktype, frames, endian, nanos)
            assert pcap_bytes(path, 7000) == IpBytes(up=1572, down=52, packets_up=2, packets_down=1), name

    write_pcap(tmp_path / "wifi.pcap", 105, [])
    with pytest.raises(ConfigError, match="link type 105"):
        pcap_bytes(tmp_path / "wifi.pcap", 7000)
    (tmp_path / "text.pcap").write_bytes(b"not a capture file at all")
    with pytest.raises(ConfigError, match="not a classic pcap"):
        pcap_bytes(tmp_path / "text.pcap", 7000)


def test_capture_writes_a_file_tcpdump_reads(tmp_path: Path) -> None:
    capture_or_skip()
    with open_link(LINKS["loopback"]) as ends:
        exchange(ends, "lo", tmp_path / "lo.pcap")
    out = subprocess.run(["tcpdump", "-r", str(tmp_path / "lo.pcap"), "-n"], capture_output=True, text=True)
    assert out.returncode == 0 and "Flags [S]" in out.stdout

"""Traffic counted outside the program: the server's socket (``ss``) and packets on the wire (tcpdump).

The device's own socket is read with ``TCP_INFO`` by the client (``CloudClient.socket_bytes``). Here:

- ``server_socket_bytes``: the same kernel counters for the server's end of the connection, read with
  ``ss`` from outside the server process (inside its network namespace when it has one);
- ``capture`` + ``pcap_bytes``: a tcpdump capture on the device's interface, the paper's method, summed
  as IP-level bytes (IP and TCP headers, pure ACKs and retransmissions included, link-layer header not).

``tcp_segments`` reads the capture's TCP segments; ``capture_text`` renders them as what an eavesdropper reads.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import NamedTuple

from lambdasplit.errors import ConfigError
from lambdasplit.lifetime import end_with_this_process
from lambdasplit.server.process import stop_process


def _in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def server_socket_bytes(port: int, netns: str | None = None) -> tuple[int, int] | None:
    """(sent, received) TCP payload bytes of established sockets whose local port is ``port``.

    ``sent`` counts acknowledged bytes, like the client's count. Only the side that opened the connection
    has its SYN in ``bytes_acked`` (the client subtracts it); the server's SYN-ACK is not counted, so
    nothing is subtracted here. ``ss`` leaves out counters that are zero, so a listed socket without them
    counts (0, 0). None if ``ss`` is missing or shows no such socket.
    """
    if shutil.which("ss") is None:
        return None
    argv = _in_netns(netns, ["ss", "-tinH", "state", "established", f"( sport = :{port} )"])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    if not out.strip():
        return None
    acked = sum(int(x) for x in re.findall(r"\bbytes_acked:(\d+)", out))
    received = sum(int(x) for x in re.findall(r"\bbytes_received:(\d+)", out))
    return acked, received


def capture_unavailable() -> str | None:
    """Why a capture cannot run here, or None."""
    if shutil.which("tcpdump") is None:
        return "tcpdump is not installed (Debian: apt-get install tcpdump)"
    if os.geteuid() != 0:
        return "capturing packets needs root"
    return None


@contextmanager
def capture(iface: str, port: int, path: Path, snaplen: int = 128) -> Iterator[Path]:
    """Record TCP packets to or from ``port`` on ``iface`` into the pcap file ``path`` while the block runs.

    ``snaplen`` bytes of each packet are kept: the default holds the headers (byte counts come from them);
    0 keeps whole packets, for looking at payloads (``pcap_payloads``).
    """
    if reason := capture_unavailable():
        raise ConfigError(reason)
    argv = ["tcpdump", "-i", iface, "-w", str(path), "-U", "-n", "-s", str(snaplen), "--immediate-mode"]
    argv.append(f"tcp port {port}")
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=end_with_this_process()
    )  # tcpdump ends with this process, however it ends (lifetime.py)
    answered = threading.Event()  # tcpdump said it listens, or its stderr ended (it exited)
    lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr or ():
            lines.append(line)
            if "listening on" in line:
                answered.set()
        answered.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    if not answered.wait(15) or not any("listening on" in line for line in lines):
        stop_process(proc, timeout=2)
        raise ConfigError(f"tcpdump did not start on {iface}: {''.join(lines).strip()[-500:] or 'no answer in 15 s'}")
    try:
        yield path
    finally:
        _drained(path)
        stop_process(proc)  # SIGINT: tcpdump flushes the file and exits


def _drained(path: Path, quiet: float = 0.4, limit: float = 5.0) -> None:
    """Wait until tcpdump has written what the kernel holds for it: the file has not grown for ``quiet`` seconds.

    On SIGINT tcpdump stops reading its ring buffer, and packets it has not read yet are lost: on a loaded machine
    a whole short exchange could be (a capture of 0 packets was seen in tests).
    """
    deadline, size, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


@dataclass(frozen=True)
class IpBytes:
    """IP-level bytes and packets in a capture, by direction relative to the server's port."""

    up: int  # to the server
    down: int  # from the server
    packets_up: int
    packets_down: int


_LINKTYPE_ETHERNET, _LINKTYPE_LINUX_SLL, _LINKTYPE_RAW, _LINKTYPE_LINUX_SLL2 = 1, 113, 101, 276
_LINKTYPES = (_LINKTYPE_ETHERNET, _LINKTYPE_LINUX_SLL, _LINKTYPE_RAW, _LINKTYPE_LINUX_SLL2)
_ETHERTYPE_IPV4, _ETHERTYPE_IPV6, _ETHERTYPE_VLAN = 0x0800, 0x86DD, 0x8100


def pcap_bytes(path: Path, server_port: int) -> IpBytes:
    """Sum the IP packets of TCP segments to and from ``server_port`` in a classic pcap file.

    Lengths come from the IP headers (the packets' own sizes), so a small snap length loses nothing.
    """
    up = down = packets_up = packets_down = 0
    for segment in tcp_segments(path):
        if segment.dport == server_port:
            up, packets_up = up + segment.size, packets_up + 1
        elif segment.sport == server_port:
            down, packets_down = down + segment.size, packets_down + 1
    return IpBytes(up, down, packets_up, packets_down)


def pcap_payloads(path: Path, server_port: int) -> tuple[bytes, bytes]:
    """TCP payload bytes (as captured) to and from ``server_port``, each direction concatenated in order.

    Needs a capture with whole packets (``capture(..., snaplen=0)``); meant for searching what crossed.
    Packets are taken in capture order, retransmissions included: ``capture_text`` reassembles streams.
    """
    up, down = bytearray(), bytearray()
    for segment in tcp_segments(path):
        if segment.dport == server_port:
            up += segment.payload
        elif segment.sport == server_port:
            down += segment.payload
    return bytes(up), bytes(down)


class TcpSegment(NamedTuple):
    """One TCP segment of a capture."""

    size: int  # the IP packet's length, from its header
    src: str  # IP addresses, as text
    dst: str
    sport: int
    dport: int
    seq: int  # sequence number of the first payload byte (of the SYN itself on a SYN)
    flags: int  # TCP flags byte: FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10
    payload: bytes  # as captured: shorter than ``length`` when the snap length cut the packet
    length: int  # payload length on the wire, from the IP header


TCP_FIN, TCP_SYN = 0x01, 0x02


def tcp_segments(path: Path) -> Iterator[TcpSegment]:
    """The TCP segments of a classic pcap file, in capture order (other packets are skipped)."""
    data = path.read_bytes()
    if len(data) < 24:
        raise ConfigError(f"{path} is not a pcap file (too short)")
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
    if magic not in endian:
        raise ConfigError(f"{path} is not a classic pcap file (magic {magic.hex()})")
    e = endian[magic]
    linktype = struct.unpack_from(f"{e}I", data, 20)[0]
    if linktype not in _LINKTYPES:
        raise ConfigError(f"pcap link type {linktype} is not supported (Ethernet, Linux SLL and SLL2, raw IP are)")
    offset = 24
    while offset + 16 <= len(data):
        caplen = struct.unpack_from(f"{e}I", data, offset + 8)[0]
        packet = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        parsed = _ip_packet(packet, linktype)
        if parsed is not None:
            yield parsed


def _ip_packet(packet: bytes, linktype: int) -> TcpSegment | None:
    """The TCP segment in one captured frame, or None for anything else."""
    if linktype == _LINKTYPE_ETHERNET:
        if len(packet) < 14:
            return None
        ethertype, start = struct.unpack_from("!H", packet, 12)[0], 14
        if ethertype == _ETHERTYPE_VLAN and len(packet) >= 18:
            ethertype, start = struct.unpack_from("!H", packet, 16)[0], 18
    elif linktype == _LINKTYPE_LINUX_SLL:
        if len(packet) < 16:
            return None
        ethertype, start = struct.unpack_from("!H", packet, 14)[0], 16
    elif linktype == _LINKTYPE_LINUX_SLL2:  # what ``tcpdump -i any`` writes
        if len(packet) < 20:
            return None
        ethertype, start = struct.unpack_from("!H", packet, 0)[0], 20
    elif linktype == _LINKTYPE_RAW:
        ethertype, start = (_ETHERTYPE_IPV4 if packet[:1] and packet[0] >> 4 == 4 else _ETHERTYPE_IPV6), 0
    else:
        return None
    ip = packet[start:]
    if ethertype == _ETHERTYPE_IPV4 and len(ip) >= 20:
        header, size, proto = (ip[0] & 0x0F) * 4, struct.unpack_from("!H", ip, 2)[0], ip[9]
        src, dst = str(IPv4Address(ip[12:16])), str(IPv4Address(ip[16:20]))
    elif ethertype == _ETHERTYPE_IPV6 and len(ip) >= 40:
        header, size, proto = 40, 40 + struct.unpack_from("!H", ip, 4)[0], ip[6]
        src, dst = str(IPv6Address(ip[8:24])), str(IPv6Address(ip[24:40]))
    else:
        return None
    if proto != 6 or len(ip) < header + 4:  # TCP only (IPv6 extension headers are not followed)
        return None
    sport, dport = struct.unpack_from("!HH", ip, header)
    seq = struct.unpack_from("!I", ip, header + 4)[0] if len(ip) >= header + 8 else 0
    tcp_header = (ip[header + 12] >> 4) * 4 if len(ip) > header + 12 else 20
    flags = ip[header + 13] if len(ip) > header + 13 else 0
    length = max(size - header - tcp_header, 0)
    return TcpSegment(size, src, dst, sport, dport, seq, flags, ip[header + tcp_header : size], length)

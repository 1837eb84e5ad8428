"""A packet-level delay line: Ethernet frames between two interfaces, held and paced like a real link.

Linux's usual link emulator is the ``netem`` qdisc. Kernels built without it (this project's CI VMs have
``tbf`` and ``htb`` but no ``netem``) cannot add delay in the kernel, so ``links.open_link`` puts this
relay between the device's and the server's veth pairs instead. Each direction is a FIFO link:

- serialisation at the link's rate: a frame of ``n`` bytes occupies the link for ``8 n / rate`` seconds,
  after the frames queued before it (the rate applies to Ethernet frame bytes);
- then propagation: it leaves ``delay`` seconds later.

Every frame crosses (ARP included); nothing is reordered, rewritten or invented. The queue holds up to
``queue_bytes`` per direction; beyond that frames are dropped, as a router's buffer would. The relay reads
and writes with raw ``AF_PACKET`` sockets, so it needs root in the namespace that holds both interfaces.

    python -m lambdasplit.bench.delayline IFACE_A IFACE_B --a-to-b RATE_MBIT:DELAY_MS --b-to-a RATE_MBIT:DELAY_MS

prints ``delayline: ready`` once both sockets listen and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

READY = "delayline: ready"
_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4  # frames this socket (or the host) sent out: not to be relayed back
_SOL_PACKET, _PACKET_VNET_HDR = 263, 15  # linux/if_packet.h
_VNET_HDR_BYTES = 10  # struct virtio_net_hdr


@dataclass(frozen=True)
class Shape:
    """One direction of a link: ``rate_mbit`` (None: no serialisation limit) and one-way ``delay_ms``."""

    rate_mbit: float | None
    delay_ms: float

    @classmethod
    def parse(cls, spec: str) -> Shape:
        rate, _, delay = spec.partition(":")
        return cls(None if rate in ("", "none") else float(rate), float(delay or 0))


def _open(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    # Each frame read carries a virtio_net_hdr, and the same header is given back when it is sent: a sender's
    # checksum offload (the TCP checksum not yet filled in) travels with the frame and is completed by the
    # kernel, as a NIC would, instead of leaving the frame with a wrong checksum that the receiver drops.
    s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
    s.bind((iface, 0))
    return s


class Direction:
    """Frames read on ``src`` are sent on ``dst`` after serialisation and delay."""

    def __init__(self, src: socket.socket, dst: socket.socket, shape: Shape, queue_bytes: int) -> None:
        self.src, self.dst, self.shape, self.queue_bytes = src, dst, shape, queue_bytes
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.ready = threading.Condition()
        self.busy_until = 0.0  # when the link finishes serialising the last accepted frame
        self.frames = self.bytes = self.dropped = 0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._send, daemon=True).start()

    def _read(self) -> None:
        bits_per_second = self.shape.rate_mbit * 1e6 if self.shape.rate_mbit else None
        delay = self.shape.delay_ms / 1e3
        while True:
            frame, address = self.src.recvfrom(65536)
            if address[2] == _PACKET_OUTGOING:
                continue
            now = time.monotonic()
            with self.ready:
                size = len(frame) - _VNET_HDR_BYTES  # the Ethernet frame
                if self.queued + size > self.queue_bytes:
                    self.dropped += 1
                    continue
                start = max(now, self.busy_until)
                self.busy_until = start + (size * 8 / bits_per_second if bits_per_second else 0.0)
                self.queue.append((self.busy_until + delay, frame))
                self.queued += size
                self.ready.notify()

    def _send(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, frame = self.queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.ready:
                self.queue.popleft()
                self.queued -= len(frame) - _VNET_HDR_BYTES
            self.dst.send(frame)
            self.frames += 1
            self.bytes += len(frame) - _VNET_HDR_BYTES


def run(a: str, b: str, a_to_b: Shape, b_to_a: Shape, queue_bytes: int = 16 << 20) -> tuple[Direction, Direction]:
    """Start relaying between interfaces ``a`` and ``b`` (daemon threads); returns both directions."""
    sa, sb = _open(a), _open(b)
    forward, backward = Direction(sa, sb, a_to_b, queue_bytes), Direction(sb, sa, b_to_a, queue_bytes)
    forward.start()
    backward.start()
    return forward, backward


def _watch_parent() -> None:
    """End with the process that started this relay (``lambdasplit.lifetime``: SIGTERM once it is gone). This script
    runs isolated (``python -I``), so the package is found from the script's own path; importing it is cheap."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lambdasplit.lifetime import watch_parent

    watch_parent()


def main() -> None:
    ap = argparse.ArgumentParser(description="Relay Ethernet frames between two interfaces with rate and delay.")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--a-to-b", type=Shape.parse, required=True, help="RATE_MBIT:DELAY_MS (RATE 'none': unpaced)")
    ap.add_argument("--b-to-a", type=Shape.parse, required=True)
    ap.add_argument("--queue-bytes", type=int, default=16 << 20)
    args = ap.parse_args()
    _watch_parent()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run(args.a, args.b, args.a_to_b, args.b_to_a, args.queue_bytes)
    print(READY, flush=True)
    stop.wait()


if __name__ == "__main__":
    main()

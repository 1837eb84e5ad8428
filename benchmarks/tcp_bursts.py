"""A split step's traffic alone: a request of N bytes, its answer of N bytes, then a pause, over an emulated link,
with each TCP congestion control the body link could use (docs/benchmarks.md, "The link's congestion control").

    PYTHONPATH=src python benchmarks/tcp_bursts.py [--link 1000/1000/250] [--sizes 2400,12000,24000]
        [--algorithms system,cubic] [--exchanges 12] [--pause 0.1] [--json artifacts/tcp-bursts.json]
        (root: network namespaces)

For each algorithm a fresh link (``bench.links``: the delay line between two namespaces) carries one connection: the
server (a plain TCP echo of the asked size, in the cloud's namespace) asks for the algorithm on its listening
socket, the client before connecting (``system``: the kernel's default at both ends, as the body link uses). Per
size, ``--exchanges`` exchanges, each followed by ``--pause`` seconds of idle (a step's computing); the median of
all but the first two (the connection warming up). 2.4 KB is a plain step's row of float32 each way, 24 KB a token
tree's ten. A pause longer than the retransmission timeout minus the round trip (about 0.2 s) lets a loss-based
algorithm restart its window (``net.ipv4.tcp_slow_start_after_idle``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lambdasplit.bench.links import open_link, parse_link

ECHO = r"""
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], 0))
listener.listen()
if sys.argv[2] != "system":  # accepted connections inherit it
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[2].encode())
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode(), flush=True)
while True:
    head = b""
    while len(head) < 4:
        more = conn.recv(4 - len(head))
        if not more:
            sys.exit()
        head += more
    n, got = int.from_bytes(head, "big"), 0
    while got < n:
        more = conn.recv(n - got)
        if not more:
            sys.exit()
        got += len(more)
    conn.sendall(b"a" * n)
"""


def algorithm_of(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0].decode()


def connect(host: str, port: int, name: str) -> socket.socket:
    """A connection with ``name`` asked for before connecting: BBR, once it has started on a connection, leaves
    the socket paced even after a switch to another algorithm."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.settimeout(30)
    if name != "system":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    sock.connect(address)
    return sock


def exchange(sock: socket.socket, size: int) -> float:
    started = time.perf_counter()
    sock.sendall(size.to_bytes(4, "big") + b"q" * size)
    got = 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("the echo server closed the connection")
        got += len(chunk)
    return time.perf_counter() - started


def measure(spec: str, algorithm: str, sizes: list[int], exchanges: int, pause: float) -> list[dict[str, Any]]:
    rows = []
    with open_link(parse_link(spec)) as ends:
        command = ends.cloud_command([sys.executable, "-c", ECHO, ends.cloud_host, algorithm])
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ) as server:
            assert server.stdout is not None
            try:
                port = int(server.stdout.readline())
                with connect(ends.cloud_host, port, algorithm) as sock:
                    server_side = server.stdout.readline().strip()
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for size in sizes:
                        times = []
                        for _ in range(exchanges):
                            times.append(exchange(sock, size))
                            time.sleep(pause)
                        rows.append(
                            {
                                "link": spec,
                                "asked": algorithm,
                                "device": algorithm_of(sock),
                                "server": server_side,
                                "bytes_each_way": size,
                                "median_ms": 1000 * statistics.median(times[2:]),
                                "ms": [round(1000 * t, 1) for t in times],
                            }
                        )
            finally:
                server.kill()  # it ends by itself once the connection closes; never left behind on an error
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", default="1000/1000/250", help="a bench.links name or UP/DOWN/RTT")
    ap.add_argument("--sizes", default="2400,12000,24000")
    ap.add_argument("--algorithms", default="system,cubic")
    ap.add_argument("--exchanges", type=int, default=12)
    ap.add_argument("--pause", type=float, default=0.1)
    ap.add_argument("--json", type=Path, default=Path("artifacts/tcp-bursts.json"))
    args = ap.parse_args()
    if args.exchanges < 3:
        ap.error("--exchanges must be at least 3 (the first two are not counted)")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [r for a in args.algorithms.split(",") for r in measure(args.link, a, sizes, args.exchanges, args.pause)]
    table = Table(title=f"Request and answer of N bytes each way over {args.link}, {args.pause} s apart")
    for column in ("asked", "device / server", "bytes each way", "median ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["asked"], f"{r['device']} / {r['server']}", str(r["bytes_each_way"]), f"{r['median_ms']:.1f}")
    Console().print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()

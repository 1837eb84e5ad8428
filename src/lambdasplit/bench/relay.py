"""A counting TCP relay: what crossed the socket, both ways, measured outside the protocol under test.

``CountingRelay(target)`` listens on 127.0.0.1 and forwards each accepted connection to ``target``, counting
the bytes it reads from either side (TCP payload: every WebSocket frame header and mask included, TCP/IP
headers not). Benchmarks and tests compare these counts with a protocol's own formula.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CountingRelay:
    """Forwards ``127.0.0.1:port`` to ``target``; ``up`` counts client -> target bytes, ``down`` the others.

    ``keep``: also keep every byte (``sent_up``, ``sent_down``), for tests that search the traffic.
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", *, keep: bool = False) -> None:
        self.target, self.keep = target, keep
        self.up = self.down = 0
        self.sent_up, self.sent_down = bytearray(), bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, name="relay-accept", daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def url(self, scheme: str = "ws") -> str:
        host, port = self.address
        return f"{scheme}://{host}:{port}"

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            for src, dst, up in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up), name="relay-pump", daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    if self.keep:
                        (self.sent_up if up else self.sent_down).extend(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads[1:]:
            t.join(5)

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

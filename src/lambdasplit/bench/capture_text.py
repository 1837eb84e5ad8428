"""What an eavesdropper reads in a capture: each TCP stream reassembled and its messages decoded, as text.

The paper's Fig. 3, for any pcap ``capture`` wrote with whole packets: a cloud-only capture shows the prompt
and the answer, a split capture only numbers. The steps are the ones a passive observer would take:

1. TCP: each connection's two directions are put back in sequence-number order. Out-of-order segments are
   placed where they belong, retransmitted and overlapping bytes are kept once (the first copy), and bytes the
   capture does not hold (it began mid-stream, or the snap length cut packets) are said to be missing.
2. HTTP and WebSocket (RFC 6455): an HTTP upgrade at the start is shown as its header lines; then each frame is
   parsed, a client's frames unmasked (client to server every frame is XORed with a 4-byte key, so without
   this step not even a plain-text prompt would show) and fragments joined into messages.
3. lambdasplit frames (docs/wire-format.md): each binary message is decoded. A JSON frame is shown whole;
   a tensor frame as one line, its type, shape, dtype and size, then its first numbers, which is what it holds.

Text is shown as ``strings`` finds it: runs of at least 4 printable characters (UTF-8, so any script shows).
Nothing is special-cased: what is not a frame is shown as its text runs, and TLS records are named as such
(their bytes are encrypted, so they hold no text, which is what TLS is for).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lambdasplit.bench.capture import TCP_SYN, TcpSegment, tcp_segments
from lambdasplit.errors import FrameError
from lambdasplit.wire import FrameFlags, decode_frame, frame_tensor

#: Shortest run of printable characters shown as text (``strings`` uses 4 too).
MIN_RUN = 4
#: Numbers shown of each tensor.
NUMBERS = 6

_SEQ = 1 << 32
_HTTP_STARTS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"HTTP/1.")
# Printable: anything but C0/C1 control characters (tab is kept) and U+FFFD, which stands for bytes that
# are not UTF-8.
_RUN = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f-\x9f\ufffd]{" + str(MIN_RUN) + ",}")
_OPCODES = {0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}


@dataclass(frozen=True)
class Stream:
    """One direction of a TCP connection, reassembled.

    ``chunks`` are (offset, bytes) runs that the capture holds, in order; offset 0 is the first byte after the SYN
    when the capture holds the SYN, else the lowest byte captured. Between chunks, bytes are missing.
    """

    chunks: tuple[tuple[int, bytes], ...]
    retransmitted: int  # payload bytes captured more than once (retransmissions, overlaps)
    segments: int  # segments with payload
    cut: bool  # some packet was cut at the capture's snap length

    @property
    def captured(self) -> int:
        return sum(len(data) for _, data in self.chunks)


@dataclass(frozen=True)
class Connection:
    """One TCP connection to the server's port: the client's address and both directions."""

    client: str
    server: str
    up: Stream  # client to server
    down: Stream  # server to client


@dataclass(frozen=True)
class WsMessage:
    """One WebSocket message: its opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong) and payload, unmasked."""

    opcode: int
    payload: bytes
    fragments: int = 1


def reassemble(segments: Iterable[TcpSegment]) -> Stream:
    """Put one direction's segments back in order by sequence number (mod 2³²); each byte is kept once."""
    pieces: list[tuple[int, bytes]] = []
    first: int | None = None
    syn: int | None = None
    count, cut = 0, False
    for segment in segments:
        first = segment.seq if first is None else first
        if segment.flags & TCP_SYN:
            syn = segment.seq
        if segment.payload:
            pieces.append((segment.seq, segment.payload))
            count += 1
        cut = cut or len(segment.payload) < segment.length
    if first is None:
        return Stream((), 0, 0, False)
    ref = (syn + 1) % _SEQ if syn is not None else first

    def offset(seq: int) -> int:
        d = (seq - ref) % _SEQ
        return d - _SEQ if d >= _SEQ // 2 else d  # before ``ref``: a segment captured after a later one

    placed = sorted(((offset(seq), data) for seq, data in pieces), key=lambda p: p[0])
    if syn is None and placed:  # without the SYN, the stream starts at the lowest byte captured
        placed = [(at - placed[0][0], data) for at, data in placed]
    chunks: list[tuple[int, bytearray]] = []
    end, total = 0, 0
    for at, data in placed:
        total += len(data)
        if at + len(data) <= end:
            continue  # all of it is held already
        if at > end or not chunks:
            chunks.append((at, bytearray(data)))  # after a gap (or the first)
        else:
            chunks[-1][1].extend(data[end - at :])  # the part not held yet
        end = at + len(data)
    kept = tuple((at, bytes(data)) for at, data in chunks)
    return Stream(kept, total - sum(len(d) for _, d in kept), count, cut)


def connections(pcap: Path, server_port: int) -> list[Connection]:
    """Every TCP connection to ``server_port`` in ``pcap``, in the order they appear, both ways reassembled."""
    up: dict[tuple[str, int], list[TcpSegment]] = {}
    down: dict[tuple[str, int], list[TcpSegment]] = {}
    servers: dict[tuple[str, int], str] = {}
    for segment in tcp_segments(pcap):
        if segment.dport == server_port:
            key = (segment.src, segment.sport)
            servers.setdefault(key, _address(segment.dst, segment.dport))
            up.setdefault(key, []).append(segment)
            down.setdefault(key, [])
        elif segment.sport == server_port:
            key = (segment.dst, segment.dport)
            servers.setdefault(key, _address(segment.src, segment.sport))
            down.setdefault(key, []).append(segment)
            up.setdefault(key, [])
    return [Connection(_address(*key), servers[key], reassemble(up[key]), reassemble(down[key])) for key in up]


def websocket_messages(data: bytes, *, from_client: bool) -> tuple[list[WsMessage], int, str | None]:
    """Parse WebSocket frames from the start of ``data``; (messages, bytes consumed, why it stopped or None).

    A client's frames must be masked and a server's must not (RFC 6455, 5.1), which also tells a stream that is
    not WebSocket from one that is. Fragments are joined; control frames may come between them.
    """
    messages: list[WsMessage] = []
    at = 0
    opened: tuple[int, bytearray, int] | None = None  # opcode, payload and fragments of a fragmented message
    while at < len(data):
        start = at
        if len(data) - at < 2:
            return messages, start, "an incomplete WebSocket frame header at the end of the capture"
        b0, b1 = data[at], data[at + 1]
        fin, rsv, opcode, masked, length = b0 & 0x80, b0 & 0x70, b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        at += 2
        if rsv:
            what = "compressed (permessage-deflate), not decoded" if rsv == 0x40 else "reserved bits set"
            return messages, start, f"a WebSocket frame with RSV bits {rsv >> 4:03b}: {what}"
        if opcode not in _OPCODES:
            return messages, start, f"not a WebSocket frame (first byte {b0:#04x}: opcode {opcode} is reserved)"
        if masked != from_client:
            side = "a client's frame unmasked" if from_client else "a server's frame masked"
            return messages, start, f"not a WebSocket frame (first bytes {data[start : start + 2].hex()}: {side})"
        if opcode >= 8 and (not fin or length > 125):
            return messages, start, f"not a WebSocket frame (a {_OPCODES[opcode]} frame fragmented or long)"
        if opcode == 0 and opened is None:
            return messages, start, "not a WebSocket frame (a continuation frame, but no message to continue)"
        if opcode in (1, 2) and opened is not None:
            return messages, start, "not a WebSocket frame (a new message before the last one's final fragment)"
        size = {126: 2, 127: 8}.get(length, 0)
        if len(data) - at < size + 4 * masked:
            return messages, start, "an incomplete WebSocket frame header at the end of the capture"
        if size:
            length = int.from_bytes(data[at : at + size], "big")
            at += size
        key = data[at : at + 4] if masked else b""
        at += len(key)
        if len(data) - at < length:
            return messages, start, f"an incomplete WebSocket frame ({len(data) - at:,} of {length:,} B captured)"
        payload = unmask(data[at : at + length], key) if masked else data[at : at + length]
        at += length
        if opcode >= 8:
            messages.append(WsMessage(opcode, payload))
            continue
        if opened is None:
            opened = (opcode, bytearray(), 0)
        opened[1].extend(payload)
        opened = (opened[0], opened[1], opened[2] + 1)
        if fin:
            messages.append(WsMessage(opened[0], bytes(opened[1]), opened[2]))
            opened = None
    if opened is not None:
        return messages, len(data), "a fragmented WebSocket message whose last fragment is not in the capture"
    return messages, at, None


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` repeated (RFC 6455, 5.3); the same step masks and unmasks."""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def text_runs(data: bytes) -> list[str]:
    """Runs of at least ``MIN_RUN`` printable characters in ``data`` read as UTF-8, as ``strings`` shows them."""
    return _RUN.findall(data.decode("utf-8", errors="replace"))


def capture_text(pcap: Path, server_port: int) -> str:
    """The readable rendering of ``pcap``: per connection to ``server_port``, what each direction carried."""
    lines = [
        f"What {pcap.name} carried to and from port {server_port}: each TCP direction reassembled by sequence",
        "number, WebSocket frames unmasked, lambdasplit frames decoded (docs/wire-format.md). Text: runs of",
        f"{MIN_RUN}+ printable characters, as `strings` shows them; tensors: shape, size and first numbers.",
    ]
    found = connections(pcap, server_port)
    if not found:
        lines += ["", "(no TCP segment to or from this port)"]
    for i, conn in enumerate(found, 1):
        lines += ["", f"== connection {i}: {conn.client} → {conn.server}"]
        for arrow, stream, from_client in (("device → cloud", conn.up, True), ("cloud → device", conn.down, False)):
            lines.append(f"-- {arrow}: {_amount(stream)}")
            lines += render_stream(stream, from_client=from_client)
    return "\n".join(lines) + "\n"


def write_capture_text(pcap: Path, server_port: int) -> Path:
    """Write ``capture_text`` beside ``pcap`` (``NAME.txt`` for ``NAME.pcap``); its path."""
    path = pcap.with_suffix(".txt")
    path.write_text(capture_text(pcap, server_port), encoding="utf-8")
    return path


def render_stream(stream: Stream, *, from_client: bool) -> list[str]:
    lines = ["[packets were cut at the capture's snap length: payloads are incomplete]"] if stream.cut else []
    end = 0
    for at, data in stream.chunks:
        if at == 0:
            lines += render_bytes(data, from_client=from_client)
        else:  # where the next message starts is lost with the missing bytes
            where = "before the capture began" if end == 0 else "missing from the capture"
            lines.append(f"[{at - end:,} B {where}; the next {len(data):,} B without message boundaries, as text:]")
            lines += text_runs(data)
        end = at + len(data)
    return lines


def render_bytes(data: bytes, *, from_client: bool) -> list[str]:
    """One contiguous stretch of a direction: TLS records, or HTTP then WebSocket messages, or text runs."""
    if records := _tls_records(data):
        return [f"[TLS: {records} records, {len(data):,} B, encrypted: no text and no frame to read]"]
    lines: list[str] = []
    if data.startswith(_HTTP_STARTS):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines += text_runs(head)
        upgraded = b"upgrade: websocket" in head.lower() if from_client else head.startswith(b"HTTP/1.1 101")
        if not upgraded:
            return lines + text_runs(rest)  # plain HTTP: the body (and any later request) as text
        data = rest
    messages, used, problem = websocket_messages(data, from_client=from_client)
    for message in messages:
        lines += _render_message(message)
    if problem is not None:
        lines.append(f"[{len(data) - used:,} B: {problem}; as text:]" if used < len(data) else f"[{problem}]")
        lines += text_runs(data[used:])
    return lines


def _render_message(message: WsMessage) -> list[str]:
    size = f"{len(message.payload):,} B" + (f" in {message.fragments} fragments" if message.fragments > 1 else "")
    if message.opcode == 2:
        return _render_frame(message.payload, size)
    if message.opcode == 8:
        code = int.from_bytes(message.payload[:2], "big") if len(message.payload) >= 2 else None
        return [f"[WebSocket close, code {code}]", *text_runs(message.payload[2:])]
    return [f"[WebSocket {_OPCODES[message.opcode]} message, {size}]", *text_runs(message.payload)]


def _render_frame(data: bytes, size: str) -> list[str]:
    try:
        frame = decode_frame(data)
    except FrameError as exc:
        return [f"[binary message, {size}, not a lambdasplit frame ({exc.code}: {exc})]", *text_runs(data)]
    name = frame.type.name
    flags = "".join(f", {f.name}" for f in FrameFlags if f.name and frame.flags & f)
    if frame.dtype.is_tensor:
        shape = "×".join(map(str, frame.shape))
        head = f"[{name} frame: {shape} {frame.dtype.name.lower()}, session {frame.session}, "
        head += f"position {frame.position}{flags}, {size}]"
        try:
            values = frame_tensor(frame).flatten()
        except FrameError as exc:
            return [f"{head} ({exc.code}: {exc})"]
        numbers = " ".join(f"{v:.4g}" for v in values[:NUMBERS].tolist())
        return [f"{head} {numbers}" + (" …" if values.numel() > NUMBERS else "")]
    if frame.payload:  # JSON: decode_frame checked it is UTF-8 JSON, shown whole (compact, so one line)
        return [f"[{name} frame: JSON, {size}]", frame.payload.decode("utf-8")]
    return [f"[{name} frame, {size}]"]


def _tls_records(data: bytes) -> int:
    """How many TLS records ``data`` starts with (0 if it does not start with one)."""
    count, at = 0, 0
    while at + 5 <= len(data):
        kind, major, minor, length = data[at], data[at + 1], data[at + 2], int.from_bytes(data[at + 3 : at + 5], "big")
        if kind not in (20, 21, 22, 23) or major != 3 or minor > 4 or length > (1 << 14) + 256:
            break
        count, at = count + 1, at + 5 + length
    return count


def _amount(stream: Stream) -> str:
    plural = "" if stream.segments == 1 else "s"
    again = f", {stream.retransmitted:,} B of it again (retransmitted)" if stream.retransmitted else ""
    return f"{stream.captured:,} B of TCP payload in {stream.segments} segment{plural}{again}"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

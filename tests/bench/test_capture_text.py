"""The wire side by side (the paper's Fig. 3): a capture reassembled and decoded into what an eavesdropper reads.

The unit tests build pcap files byte by byte (out-of-order segments, a retransmission, a masked frame split
across segments) and frame WebSocket messages with the websockets library's own serializer, so the parser is
checked against another implementation of RFC 6455. The end-to-end test runs the cloud-only and a split row
of ``bench llm`` on loopback with a capture: the prompt and the answer are in the one, not in the other.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from lambdasplit.bench.capture import TcpSegment, capture_unavailable, pcap_payloads
from lambdasplit.bench.capture_text import (
    capture_text,
    connections,
    reassemble,
    render_bytes,
    unmask,
    websocket_messages,
    write_capture_text,
)
from lambdasplit.bench.links import LINKS
from lambdasplit.bench.llm import TableConfig, run_table
from lambdasplit.wire import Frame, MessageType, encode_frame, tensor_frame

PORT, CLIENT = 8765, 50123
PROMPT = "Where is the secret meeting tonight?"
SYN, ACK, PSH = 0x02, 0x10, 0x08


def segment(sport: int, dport: int, seq: int, payload: bytes = b"", flags: int = PSH | ACK) -> bytes:
    """An Ethernet frame holding one IPv4 TCP segment from 127.0.0.1 to 127.0.0.1."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0, 64, 6, 0, b"\x7f\0\0\1", b"\x7f\0\0\1")
    return bytes(12) + b"\x08\x00" + ip + tcp + payload


def write_pcap(path: Path, frames: list[bytes], snaplen: int = 0) -> Path:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen or 262144, 1)
    for frame in frames:
        kept = frame[:snaplen] if snaplen else frame
        out += struct.pack("<IIII", 0, 0, len(kept), len(frame)) + kept
    path.write_bytes(out)
    return path


def ws(message: bytes, *, client: bool, opcode: Opcode = Opcode.BINARY, fin: bool = True) -> bytes:
    """One WebSocket frame as the websockets library writes it (a client's masked with a random key)."""
    return WsFrame(opcode, message, fin=fin).serialize(mask=client)


UPGRADE = (
    b"GET /v1/split HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def test_a_masked_prompt_split_reordered_and_retransmitted_reads_back_whole(tmp_path: Path) -> None:
    """Up: the upgrade, then a GENERATE whose masked frame spans two segments captured out of order, the first
    of them twice, and a text message in two fragments with a ping between them. Down: the 101 answer, a tensor
    RESULT and a TEXT. The client's sequence numbers wrap around 2^32 on the way."""
    generate = ws(encode_frame(Frame.json(MessageType.GENERATE, {"prompt": PROMPT})), client=True)
    fragments = (
        ws(b"first half, ", client=True, opcode=Opcode.TEXT, fin=False)
        + ws(b"ping", client=True, opcode=Opcode.PING)
        + ws(b"second half", client=True, opcode=Opcode.CONT)
    )
    hidden = torch.tensor([[1.0, -2.0, 0.5, 65504.0]])
    result = ws(encode_frame(tensor_frame(MessageType.RESULT, hidden, "float32", session=1, position=7)), client=False)
    text = ws(encode_frame(Frame.json(MessageType.TEXT, {"text": "Behind the old mill, at nine."})), client=False)

    isn, server_isn = (1 << 32) - 100, 5000  # the client's stream crosses 2^32 inside the upgrade request
    a, b = generate[:30], generate[30:]  # the prompt's masked bytes lie in both halves
    up_at = isn + 1 + len(UPGRADE)
    frames = [
        segment(CLIENT, PORT, isn, flags=SYN),
        segment(PORT, CLIENT, server_isn, flags=SYN | ACK),
        segment(CLIENT, PORT, (isn + 1) % (1 << 32), UPGRADE),
        segment(PORT, CLIENT, server_isn + 1, SWITCHING),
        segment(CLIENT, PORT, (up_at + len(a)) % (1 << 32), b),  # the second half first
        segment(CLIENT, PORT, up_at % (1 << 32), a),
        segment(CLIENT, PORT, up_at % (1 << 32), a),  # retransmitted
        segment(CLIENT, PORT, (up_at + len(generate)) % (1 << 32), fragments),
        segment(PORT, CLIENT, server_isn + 1 + len(SWITCHING), result + text),
        segment(4242, 9999, 1, b"another connection entirely"),
    ]
    pcap = write_pcap(tmp_path / "x.pcap", frames)

    (conn,) = connections(pcap, PORT)
    assert conn.client == f"127.0.0.1:{CLIENT}" and conn.server == f"127.0.0.1:{PORT}"
    assert conn.up.chunks == ((0, UPGRADE + generate + fragments),) and conn.up.retransmitted == len(a)
    assert conn.down.chunks == ((0, SWITCHING + result + text),) and conn.down.retransmitted == 0
    # The capture in packet order, without unmasking, does not show the prompt: the masking hides it.
    assert PROMPT.encode() not in pcap_payloads(pcap, PORT)[0]

    rendered = write_capture_text(pcap, PORT).read_text()
    assert rendered == capture_text(pcap, PORT)
    up, down = rendered.split("-- device → cloud: ")[1].split("-- cloud → device: ")
    assert up.startswith(f"{len(UPGRADE + generate + fragments):,} B of TCP payload in 5 segments, {len(a)} B of it")
    assert "GET /v1/split HTTP/1.1\nHost: 127.0.0.1:8765\nUpgrade: websocket\n" in up
    assert f'[GENERATE frame: JSON, {len(generate) - 6} B]\n{{"prompt":"{PROMPT}"}}\n' in up
    assert "[WebSocket ping message, 4 B]\nping\n" in up
    assert "[WebSocket text message, 23 B in 2 fragments]\nfirst half, second half\n" in up
    assert "HTTP/1.1 101 Switching Protocols\n" in down
    assert "[RESULT frame: 1×4 float32, session 1, position 7, 40 B] 1 -2 0.5 6.55e+04\n" in down
    assert '{"text":"Behind the old mill, at nine."}' in down
    assert "another connection" not in rendered


def test_what_the_capture_does_not_hold_is_said() -> None:
    """A segment never captured leaves a gap (after it, the stream is shown as text runs); without the SYN the
    lowest captured byte is offset 0; packets cut by the snap length are flagged."""

    def seg(seq: int, payload: bytes, length: int | None = None) -> TcpSegment:
        n = len(payload) if length is None else length
        return TcpSegment(40 + n, "127.0.0.1", "127.0.0.1", CLIENT, PORT, seq, PSH | ACK, payload, n)

    stream = reassemble([seg(1010, b"world, again"), seg(1000, b"hello"), seg(1003, b"lo th")])
    assert stream.chunks == ((0, b"hello th"), (10, b"world, again")) and stream.retransmitted == 2
    assert not stream.cut and stream.captured == 20
    assert reassemble([seg(7, b"abc", length=1400)]).cut
    assert reassemble([]).chunks == ()


def test_a_gap_a_snapped_capture_and_tls_are_rendered_as_such(tmp_path: Path) -> None:
    frame = ws(encode_frame(Frame.json(MessageType.GENERATE, {"prompt": PROMPT})), client=False)
    gap = write_pcap(
        tmp_path / "gap.pcap",
        [segment(PORT, CLIENT, 100, frame[:10]), segment(PORT, CLIENT, 120, frame[20:])],
    )
    rendered = capture_text(gap, PORT)
    assert "[10 B: an incomplete WebSocket frame (8 of 69 B captured); as text:]" in rendered
    assert "[10 B missing from the capture; the next 51 B without message boundaries, as text:]" in rendered
    assert 'the secret meeting tonight?"}' in rendered  # after the gap: the server's unmasked bytes, as text

    snapped = write_pcap(tmp_path / "snap.pcap", [segment(PORT, CLIENT, 100, frame)], snaplen=80)
    assert "[packets were cut at the capture's snap length: payloads are incomplete]" in capture_text(snapped, PORT)

    record = bytes([23, 3, 3]) + struct.pack("!H", 40) + bytes(range(40))
    tls = write_pcap(tmp_path / "tls.pcap", [segment(CLIENT, PORT, 1, record * 3)])
    assert "[TLS: 3 records, 135 B, encrypted: no text and no frame to read]" in capture_text(tls, PORT)
    empty = write_pcap(tmp_path / "empty.pcap", [])
    assert "(no TCP segment to or from this port)" in capture_text(empty, PORT)


def test_websocket_framing_rules() -> None:
    assert unmask(unmask(b"some payload", b"\x01\x02\x03\x04"), b"\x01\x02\x03\x04") == b"some payload"
    assert unmask(b"", b"abcd") == b""
    big = bytes(70_000)  # a 64-bit length, masked
    (message,), used, problem = websocket_messages(ws(big, client=True), from_client=True)
    assert message.payload == big and problem is None
    # Each side's masking is checked: a server's masked frame is not taken for WebSocket.
    messages, used, problem = websocket_messages(ws(b"abcd", client=True), from_client=False)
    assert messages == [] and used == 0 and problem is not None and "a server's frame masked" in problem
    _, _, problem = websocket_messages(b"\xc2\x01x", from_client=False)
    assert problem is not None and "permessage-deflate" in problem
    _, _, problem = websocket_messages(ws(b"x", client=False, opcode=Opcode.CONT), from_client=False)
    assert problem is not None and "no message to continue" in problem
    _, _, problem = websocket_messages(ws(b"abc", client=False, fin=False), from_client=False)
    assert problem is not None and "last fragment is not in the capture" in problem
    close = WsFrame(Opcode.CLOSE, struct.pack("!H", 1000) + b"going away").serialize(mask=False)
    text = capture_text_of(close)
    assert "[WebSocket close, code 1000]\ngoing away" in text


def capture_text_of(down: bytes) -> str:
    return "\n".join(render_bytes(down, from_client=False))


@pytest.mark.skipif(capture_unavailable() is not None, reason=f"no capture: {capture_unavailable()}")
def test_cloud_only_capture_shows_the_prompt_and_answer_a_split_capture_only_numbers(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    config = TableConfig(
        model=str(path),
        prompt=PROMPT,
        new_tokens=4,
        local_layers=(2,),
        methods=("cloud-only", "cache"),
        capture_dir=tmp_path,
    )
    result = run_table(config, [LINKS["loopback"]])
    rows = {row.method: row for row in result.rows}
    cloud = (tmp_path / "loopback-cloud-only-0_all.txt").read_text()
    (split_txt,) = tmp_path.glob("loopback-cache-*.txt")
    split = split_txt.read_text()
    answer = rows["cloud-only"].text
    assert rows["cache"].text == answer  # the same greedy answer both ways
    # The GENERATE and TEXT frames' JSON, as the client and the server wrote it.
    assert f'{{"prompt":"{PROMPT}",' in cloud and f'{{"text":{json.dumps(answer, ensure_ascii=False)},' in cloud
    assert PROMPT not in split and "secret" not in split and '"text"' not in split
    assert answer.strip() and answer.strip() not in split
    assert "[FORWARD frame: " in split and "[RESULT frame: " in split
    assert "float16, session 1, position " in split

"""What the device and a share server say to each other over their WebSocket (one connection per session).

Control messages are JSON text; tensors travel in binary messages, one fixed struct header then int64 words
(little-endian)::

    device -> server   {"type": "open", "session": hex(16 B), "party": 0|1, "key": hex(16 B), "link": hex(32 B),
                        "fingerprint": hex}
    server -> device   {"type": "ready", "party", "layers", "hidden_size", "frac_bits", "max_context", "fingerprint",
                        "heads", "kv_heads", "head_dim"}
    device -> server   FORWARD    "LSFW" | step u32 | position u32 | rows u32 | width u32 | flags u32 |
                                  share (rows x width)   (flags: WIDE = 1, the forward's norms fit any row)
    device -> server1  POOL       "LSPL" | kind u32 | n u32 | n corrections of kind mul, and or bit, in stream order
    server1 -> device  REQUEST    "LSRQ" | seq u32 | kind u8 | rank_a u8 | rank_b u8 | dims u32 ...
                                  (matmul: one triple of those shapes; mul/and/bit: a pool short by dims[0])
    device -> server1  CORRECTION "LSCR" | seq u32 | tensor (a matmul request's c1)
    device -> server1  DEALT      "LSDA" | rank_a u8 | rank_b u8 | dims u32 ... | tensor (a matmul triple's c1,
                                  dealt ahead: sent before the FORWARD, one per product the forward will take)
    server -> device   OUTPUT     "LSOU" | step u32 | rows u32 | width u32 | rounds u32 | peer bytes u64 |
                                  used mul u64 | used and u64 | used bit u64 | share (rows x width) |
                                  norm checks (2 x layers, rows, 3: mean square, rsqrt, scale exponent)
                                  (rounds with the peer and bytes sent to it in this forward, for the cost report;
                                  pooled corrections used, for the device's next deal ahead: server 1 only; the
                                  norm checks' shares, for the device to see that every norm fit its row:
                                  ``body.norms_fit``)
    either way         {"type": "error", "code": ..., "message": ...}  (then the session ends)

``key`` seeds the party's stream of correlated randomness (``dealing``): it must reach only that server, so a
deployment runs these links over wss:// (TLS); ``link`` (the same on both servers) keys their peer link
(``peer``: each proves it holds it, every frame is sealed under it). ``open`` holds the session's only secrets.
The matrix products' corrections come as DEALTs before each FORWARD (their shapes follow from the rows, the context
and the body's attention heads, which ``ready`` announces: ``layer.attention_products``), and party 1 takes one per
product in order, checking its shapes; it sends a REQUEST (and reads the CORRECTION) only where none was dealt. The
elementwise kinds come as POOLs the device sends ahead (right after FORWARD, sized by what the last forward of as
many rows used), and party 1 asks only when a pool runs short. Party 0 never hears from the dealer.
"""

from __future__ import annotations

import math
import struct

import torch

from lambdasplit.errors import WireError

FORWARD = struct.Struct("<4sIIIII")
#: FORWARD's flags: ``WIDE`` asks for norms that fit any row (``ops.SharedOps.wide``), as a forward redone after an
#: implausible output does (``body.computed_again``); no other bit is defined.
WIDE = 1
REQUEST = struct.Struct("<4sIBBB")
CORRECTION = struct.Struct("<4sI")
OUTPUT = struct.Struct("<4sIIIIQQQQ")
POOL = struct.Struct("<4sII")
DEALT = struct.Struct("<4sBB")
FORWARD_MAGIC, REQUEST_MAGIC, CORRECTION_MAGIC, OUTPUT_MAGIC, POOL_MAGIC = b"LSFW", b"LSRQ", b"LSCR", b"LSOU", b"LSPL"
DEALT_MAGIC = b"LSDA"
REQUEST_KINDS = ("mul", "matmul", "and", "bit")
POOL_KINDS = ("mul", "and", "bit")
POOL_CHUNK = 1 << 19  # elements per POOL message (4 MiB)


def words(tensor: torch.Tensor) -> bytes:
    """An int64 tensor's bytes (little-endian, row-major)."""
    if tensor.dtype != torch.int64:
        raise TypeError(f"shares are int64, got {tensor.dtype}")
    return tensor.detach().to("cpu").contiguous().numpy().tobytes()


def tensor_of(data: bytes | memoryview, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """int64 words -> a tensor of ``shape``; a ``WireError`` (``bad_share``) if the size is not the shape's."""
    expected = 8 * math.prod(shape)
    if len(data) != expected:
        raise WireError(f"the {what} has {len(data)} bytes; {shape} int64 needs {expected}", code="bad_share")
    if expected == 0:
        return torch.zeros(shape, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.int64).view(shape)


def pack_request(seq: int, kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> bytes:
    dims = (*shape_a, *shape_b)
    head = REQUEST.pack(REQUEST_MAGIC, seq, REQUEST_KINDS.index(kind), len(shape_a), len(shape_b))
    return head + struct.pack(f"<{len(dims)}I", *dims)


def unpack_request(data: bytes) -> tuple[int, str, tuple[int, ...], tuple[int, ...]]:
    if len(data) < REQUEST.size:
        raise WireError(f"a dealer request of {len(data)} bytes is too short", code="bad_frame")
    magic, seq, kind, rank_a, rank_b = REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC or kind >= len(REQUEST_KINDS) or len(data) != REQUEST.size + 4 * (rank_a + rank_b):
        raise WireError("a malformed dealer request", code="bad_frame")
    dims = struct.unpack_from(f"<{rank_a + rank_b}I", data, REQUEST.size)
    return seq, REQUEST_KINDS[kind], tuple(dims[:rank_a]), tuple(dims[rank_a:])


def pack_dealt(shape_a: tuple[int, ...], shape_b: tuple[int, ...], correction: torch.Tensor) -> bytes:
    """A matrix-product triple's correction dealt ahead, with the operands' shapes it is for."""
    dims = (*shape_a, *shape_b)
    head = DEALT.pack(DEALT_MAGIC, len(shape_a), len(shape_b)) + struct.pack(f"<{len(dims)}I", *dims)
    return head + words(correction)


def unpack_dealt(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...], memoryview]:
    """(shape_a, shape_b, the correction's words) of a DEALT message; ``bad_frame`` if it is not one."""
    rank_a, rank_b = header(data, DEALT, DEALT_MAGIC, "dealt correction")
    end = DEALT.size + 4 * (rank_a + rank_b)
    if len(data) < end:
        raise WireError(f"a dealt correction of {len(data)} bytes is too short", code="bad_frame")
    dims = struct.unpack_from(f"<{rank_a + rank_b}I", data, DEALT.size)
    return tuple(dims[:rank_a]), tuple(dims[rank_a:]), memoryview(data)[end:]


def header(data: bytes, layout: struct.Struct, magic: bytes, what: str) -> tuple[int, ...]:
    """The fields after the magic of a binary message of ``layout``; ``bad_frame`` if it is not one."""
    if len(data) < layout.size or data[:4] != magic:
        raise WireError(f"expected a {what} message, got {bytes(data[:4])!r} ({len(data)} bytes)", code="bad_frame")
    return tuple(layout.unpack_from(data)[1:])


def pool_messages(kind: str, corrections: torch.Tensor) -> list[bytes]:
    """A pool top-up of ``kind`` as POOL messages of at most ``POOL_CHUNK`` elements each."""
    flat = corrections.flatten()
    code = POOL_KINDS.index(kind)
    return [POOL.pack(POOL_MAGIC, code, len(chunk)) + words(chunk) for chunk in flat.split(POOL_CHUNK) if len(chunk)]

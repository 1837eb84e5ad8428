"""What a PrivateLoRA device and its body server say over their WebSocket (one connection per session).

Control messages are JSON text; tensors travel in binary messages: one 24-byte header, then the tensor in the
project's wire encoding (``wire.tensors``: float32 by default, float16 or bfloat16 on request)::

    device -> server  {"type": "open", "adapters": {targets, rank_c2d, rank_d2c}, "dtype": "float32"}
    server -> device  {"type": "ready", "layers": [X, Y], "hidden_size", "groups": [[targets], ...],
                       "adapters": {...}, "seed", "fingerprint"}
    header            "LSPR" | kind u8 | dtype u8 | group u16 | step u32 | layer u32 | position u32 | rows u32

    kind              direction        payload (B = 1)
    FORWARD    0      device -> cloud  hidden (rows, D) at ``position`` of the session's KV cache (inference)
    TRAIN      1      device -> cloud  hidden (rows, D), a training forward: no cache, the graph is kept
    OUTPUT     2      cloud -> device  the body's output (rows, D) for ``step``
    DOWN       3      cloud -> device  u = x A of ``group`` in ``layer``: (n, rows, r_c2d)
    UP         4      device -> cloud  v = u M: (n, rows, r_d2c)
    GRAD       5      device -> cloud  dL/d(output) (rows, D) for training step ``step``
    GRAD_DOWN  6      cloud -> device  dL/dv of ``group`` in ``layer``: (n, rows, r_d2c)
    GRAD_UP    7      device -> cloud  dL/du: (n, rows, r_c2d)
    DONE       8      cloud -> device  the backward of ``step`` is complete (no payload)
    either way        {"type": "error", "code": ..., "message": ...}  (the server ends the session)

A forward is one FORWARD (or TRAIN) up, then one DOWN/UP round trip per adapted layer and group, then OUTPUT.
A training step's backward is one GRAD up, one GRAD_DOWN/GRAD_UP round trip per layer and group (last layer
first), then DONE. ``n`` is the number of projections in the group (``AdapterLayout.groups``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import torch

from lambdasplit.errors import WireError
from lambdasplit.wire.tensors import WireDtype, decode_tensor, encode_tensor, tensor_payload_size

HEADER = struct.Struct("<4sBBHIIII")
MAGIC = b"LSPR"
WIRE_DTYPES = {"float32": WireDtype.FLOAT32, "float16": WireDtype.FLOAT16, "bfloat16": WireDtype.BFLOAT16}


class Kind(IntEnum):
    FORWARD = 0
    TRAIN = 1
    OUTPUT = 2
    DOWN = 3
    UP = 4
    GRAD = 5
    GRAD_DOWN = 6
    GRAD_UP = 7
    DONE = 8


@dataclass(frozen=True)
class Message:
    kind: Kind
    step: int
    layer: int = 0
    group: int = 0
    position: int = 0
    rows: int = 0
    dtype: WireDtype = WireDtype.FLOAT32
    payload: bytes = b""

    def tensor(self, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """The payload as a float32 tensor of ``shape``; ``bad_frame`` if its size is not the shape's."""
        expected = tensor_payload_size(self.dtype, shape) if shape else 0
        if len(self.payload) != expected:
            raise WireError(
                f"the {what} has {len(self.payload)} bytes; {shape} in {self.dtype.name} needs {expected}",
                code="bad_frame",
            )
        return decode_tensor(self.payload, self.dtype, shape).to(torch.float32)


def pack(
    kind: Kind,
    step: int,
    tensor: torch.Tensor | None = None,
    *,
    layer: int = 0,
    group: int = 0,
    position: int = 0,
    dtype: WireDtype = WireDtype.FLOAT32,
) -> bytes:
    """One binary message; ``rows`` is the tensor's second-to-last dimension (positions)."""
    if tensor is None:
        return HEADER.pack(MAGIC, kind, WireDtype.NONE, group, step, layer, position, 0)
    payload, _ = encode_tensor(tensor.detach().to("cpu", torch.float32).contiguous(), dtype)
    rows = tensor.shape[-2] if tensor.dim() >= 2 else 1
    return HEADER.pack(MAGIC, kind, dtype, group, step, layer, position, rows) + payload


def unpack(data: bytes | str) -> Message:
    """A binary message's header and payload; ``bad_frame`` for text, a short header or an unknown kind or dtype."""
    if isinstance(data, str):
        raise WireError(f"expected a binary message, got text {data[:200]!r}", code="bad_frame")
    if len(data) < HEADER.size or data[:4] != MAGIC:
        raise WireError(f"not a PrivateLoRA message: {bytes(data[:4])!r} ({len(data)} bytes)", code="bad_frame")
    _, kind, dtype, group, step, layer, position, rows = HEADER.unpack_from(data)
    try:
        return Message(Kind(kind), step, layer, group, position, rows, WireDtype(dtype), bytes(data[HEADER.size :]))
    except ValueError:
        raise WireError(f"a message of unknown kind {kind} or dtype {dtype}", code="bad_frame") from None


def framing(payload: int, masked: bool) -> int:
    """Bytes a WebSocket binary frame adds to a message of ``payload`` bytes (RFC 6455: 2, 4 or 10 bytes of
    header, 4 more for the mask a client adds), plus this protocol's header: the overhead the traffic formula
    leaves out."""
    size = HEADER.size + payload
    header = 2 if size < 126 else 4 if size < 65536 else 10
    return HEADER.size + header + (4 if masked else 0)


def forward_bytes(
    groups: list[int], layers: int, hidden: int, rows: int, rank: tuple[int, int], itemsize: int
) -> tuple[int, int]:
    """Bytes at the socket (up, down) of one inference forward of ``rows`` positions: the paper's formula
    (``rows * n * r`` values per group and layer each way) plus the FORWARD and OUTPUT rows, each message with its
    framing (``framing``). ``groups``: projections per group; ``rank``: (r_c2d, r_d2c)."""
    c2d, d2c = rank
    up = hidden * rows * itemsize
    up += framing(up, masked=True)
    down = hidden * rows * itemsize
    down += framing(down, masked=False)
    for n in groups:
        sent, answered = n * rows * c2d * itemsize, n * rows * d2c * itemsize
        down += layers * (sent + framing(sent, masked=False))
        up += layers * (answered + framing(answered, masked=True))
    return up, down

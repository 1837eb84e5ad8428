"""The Λ-Split wire format: frames of hidden-state tensors and JSON control messages.

One frame is one WebSocket binary message: a 16-byte header, 4 bytes per tensor dim, then the
payload. The byte-level specification is docs/wire-format.md.

    frame = tensor_frame(MessageType.FORWARD, hidden, "float16", session=1, position=7)
    data = encode_frame(frame)                 # 1176 bytes for a (1, 576) hidden state
    hidden2 = frame_tensor(decode_frame(data)) # float32 (1, 576), equal to hidden.half()
"""

from __future__ import annotations

from lambdasplit.wire.frames import (
    DEFAULT_LIMITS,
    HEADER_BYTES_FIXED,
    MAGIC,
    VERSION,
    Frame,
    FrameFlags,
    MessageType,
    decode_frame,
    encode_frame,
    frame_tensor,
    header_size,
    payload_size,
    tensor_frame,
)
from lambdasplit.wire.limits import FrameLimits
from lambdasplit.wire.protocol import PATH, PROTOCOL, raise_for_error
from lambdasplit.wire.tensors import WireDtype, decode_tensor, encode_tensor

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER_BYTES_FIXED",
    "MAGIC",
    "PATH",
    "PROTOCOL",
    "VERSION",
    "Frame",
    "FrameFlags",
    "FrameLimits",
    "MessageType",
    "WireDtype",
    "decode_frame",
    "decode_tensor",
    "encode_frame",
    "encode_tensor",
    "frame_tensor",
    "header_size",
    "payload_size",
    "raise_for_error",
    "tensor_frame",
]

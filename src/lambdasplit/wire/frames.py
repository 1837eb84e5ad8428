"""Frames: the unit of the Λ-Split protocol, one WebSocket binary message each.

Layout (little-endian; docs/wire-format.md is the specification, this module its reference code)::

    offset 0   2 bytes  magic CE 9B ("Λ" in UTF-8)
    offset 2   u8       protocol version (1)
    offset 3   u8       message type (MessageType)
    offset 4   u8       dtype code (WireDtype)
    offset 5   u8       ndim (0..4)
    offset 6   u16      flags (bit 0 RESET, bit 1 LAST; the rest must be 0)
    offset 8   u32      session handle (0 = none)
    offset 12  u32      position of the first row of a hidden state (0 for control frames)
    offset 16  ndim x u32 dims
    then the payload, whose size must be exactly what dtype and dims imply

There is no length field: the WebSocket message already has one, so the frame's size is the
message's size and the decoder checks the payload against it. A (1, 576) float16 hidden state
costs 24 header bytes on 1152 payload bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

import torch

from lambdasplit.errors import ConfigError, FrameError
from lambdasplit.wire.limits import FORMAT_MAX_NDIM, U32_MAX, FrameLimits
from lambdasplit.wire.tensors import (
    WireDtype,
    decode_tensor,
    encode_tensor,
    tensor_payload_size,
)

MAGIC = b"\xce\x9b"
VERSION = 1
HEADER_BYTES_FIXED = 16
DEFAULT_LIMITS = FrameLimits()

# One precompiled Struct per ndim packs or unpacks the whole header in a single call.
_FIXED = struct.Struct("<2sBBBBHII")
_HEADERS = tuple(struct.Struct(_FIXED.format + "I" * n) for n in range(FORMAT_MAX_NDIM + 1))


class MessageType(IntEnum):
    """The header's message type byte. Direction and payload kind are in docs/wire-format.md."""

    HELLO = 1  # client -> server, JSON
    WELCOME = 2  # server -> client, JSON
    OPEN = 3  # client -> server, JSON session options
    OPENED = 4  # server -> client, JSON; the header's session field is the new handle
    FORWARD = 5  # client -> server, hidden state (rows, hidden) starting at `position`
    RESULT = 6  # server -> client, tensor
    CLOSE = 7  # client -> server, no payload or JSON
    CLOSED = 8  # server -> client, no payload or JSON
    PING = 9  # either way, no payload
    PONG = 10  # either way, no payload
    GENERATE = 11  # client -> server, JSON: a whole generation from text (cloud-only servers; the baseline)
    TEXT = 12  # server -> client, JSON: the generated text, answer to GENERATE
    STATE = 13  # server -> client, JSON: a diffusion scheduler's state handed to the device (CollaFuse policy)
    GOAWAY = 14  # server -> client, unasked, JSON {"deadline_s", "reason"}: the server is draining; move elsewhere
    TREE = 15  # client -> server, JSON {"parents"?, "keep"?}: for the session's next FORWARD (token trees); no reply
    ERROR = 127  # server -> client, JSON {"code": str, "message": str}


class FrameFlags(IntFlag):
    """Bits of the header's flags field. Unknown bits are rejected, so a later version can use them."""

    RESET = 1  # FORWARD only: drop the session's cache first (the paper's no-cache baseline)
    LAST = 2  # FORWARD only: the RESULT carries the last position's row only (a prompt's logits, STIP's layout)


# A plain int: with IntFlag, ~FrameFlags.RESET is FrameFlags(0) (the complement within the
# defined bits), which would let every reserved bit through.
_KNOWN_FLAGS = int(FrameFlags.RESET | FrameFlags.LAST)
_TENSORS = frozenset(d for d in WireDtype if d.is_tensor)
_JSON = frozenset({WireDtype.JSON})
_NONE_OR_JSON = frozenset({WireDtype.NONE, WireDtype.JSON})
# Which payload kinds each message type may carry; anything else is "bad_dtype".
_ALLOWED_DTYPES = {
    MessageType.HELLO: _JSON,
    MessageType.WELCOME: _JSON,
    MessageType.OPEN: _JSON,
    MessageType.OPENED: _JSON,
    MessageType.FORWARD: _TENSORS,
    MessageType.RESULT: _TENSORS,
    MessageType.CLOSE: _NONE_OR_JSON,
    MessageType.CLOSED: _NONE_OR_JSON,
    MessageType.PING: frozenset({WireDtype.NONE}),
    MessageType.PONG: frozenset({WireDtype.NONE}),
    MessageType.GENERATE: _JSON,
    MessageType.TEXT: _JSON,
    MessageType.STATE: _JSON,
    MessageType.GOAWAY: _JSON,
    MessageType.TREE: _JSON,
    MessageType.ERROR: _JSON,
}


def header_size(ndim: int) -> int:
    """Header bytes of a frame with ``ndim`` dims: 16 fixed + 4 per dim (24 for a hidden state)."""
    return HEADER_BYTES_FIXED + 4 * ndim


def payload_size(dtype: WireDtype, shape: tuple[int, ...]) -> int:
    """Exact payload bytes that ``dtype`` and ``shape`` imply (JSON: shape is (nbytes,)).

    Raises FrameError("bad_shape") for a shape the dtype cannot have.
    """
    if dtype is WireDtype.NONE:
        if shape:
            raise FrameError(f"an empty (none) payload has ndim 0, got shape {shape}", "bad_shape")
        return 0
    if dtype is WireDtype.JSON:
        if len(shape) != 1:
            raise FrameError(f"a JSON payload has ndim 1, dims [nbytes], got shape {shape}", "bad_shape")
        return shape[0]
    return tensor_payload_size(dtype, shape)


@dataclass(frozen=True)
class Frame:
    """One decoded (or to-be-encoded) frame. Construction validates it, so every Frame encodes.

    ``payload`` is the raw payload: UTF-8 JSON, tensor bytes (see tensors.py) or b"". Use
    ``Frame.json``/``json_body`` for control frames and ``tensor_frame``/``frame_tensor`` for tensors.
    """

    type: MessageType
    session: int = 0
    position: int = 0
    flags: int = 0
    dtype: WireDtype = WireDtype.NONE
    shape: tuple[int, ...] = ()
    payload: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def json(cls, type: MessageType, obj: Mapping[str, Any], session: int = 0) -> Frame:
        """A JSON control frame carrying ``obj`` (compact UTF-8; NaN/Inf are not JSON and rejected)."""
        if not isinstance(obj, Mapping):
            raise ConfigError(f"a JSON frame carries a JSON object (a dict), got {_type_name(obj)}")
        try:
            text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            payload = text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(
                f"cannot encode {_type_name(obj)} as a JSON frame ({exc}); allowed values: dict with str "
                f"keys, list, str, int, finite float, bool, None"
            ) from None
        return cls(type, session, 0, 0, WireDtype.JSON, (len(payload),), payload)

    def json_body(self) -> dict[str, Any]:
        """The JSON object of a JSON frame; {} for a frame without payload."""
        if self.dtype is WireDtype.NONE:
            return {}
        if self.dtype is not WireDtype.JSON:
            raise FrameError(
                f"{self.type.name} frame carries a {self.dtype.name.lower()} tensor, not JSON", "bad_dtype"
            )
        return _parse_json(self.payload, self.type)

    @property
    def nbytes(self) -> int:
        """Encoded size in bytes: header plus payload (the WebSocket message size)."""
        return header_size(len(self.shape)) + len(self.payload)


def encode_frame(frame: Frame) -> bytes:
    """The bytes of ``frame``: header, dims, payload (one WebSocket binary message)."""
    header = _HEADERS[len(frame.shape)].pack(
        MAGIC,
        VERSION,
        frame.type,
        frame.dtype,
        len(frame.shape),
        frame.flags,
        frame.session,
        frame.position,
        *frame.shape,
    )
    return header + frame.payload


def decode_frame(data: bytes | bytearray | memoryview, limits: FrameLimits = DEFAULT_LIMITS) -> Frame:
    """Parse and validate one frame. Raises only FrameError (with a stable ``code``) for bad bytes.

    Every declared size is checked against ``limits`` before anything is allocated from it; the
    only allocation is the payload copy (at most ``limits.max_frame_bytes``).
    """
    buf = data if isinstance(data, bytes) else memoryview(data).cast("B")
    n = len(buf)
    if n > limits.max_frame_bytes:
        raise FrameError(f"frame of {n} bytes exceeds max_frame_bytes={limits.max_frame_bytes}", "too_large")
    if n < HEADER_BYTES_FIXED:
        raise FrameError(f"frame of {n} bytes is shorter than the {HEADER_BYTES_FIXED}-byte header", "truncated")
    magic, version, mtype, dcode, ndim, flags, session, position = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic.hex(' ')}; a Λ-Split frame starts with ce 9b", "bad_magic")
    if version != VERSION:
        raise FrameError(f"protocol version {version} is not supported; this peer speaks {VERSION}", "bad_version")
    mtype = _message_type(mtype)
    dtype = _wire_dtype(dcode)
    if ndim > limits.max_ndim:
        raise FrameError(f"ndim {ndim} exceeds max_ndim={limits.max_ndim}", "bad_shape")
    hsize = header_size(ndim)
    if n < hsize:
        raise FrameError(f"frame of {n} bytes is shorter than its {hsize}-byte header (ndim {ndim})", "truncated")
    shape = _HEADERS[ndim].unpack_from(buf)[8:]
    if ndim and max(shape) > limits.max_dim:
        raise FrameError(f"shape {shape} has a dim above max_dim={limits.max_dim}", "too_large")
    expected = payload_size(dtype, shape)
    if dtype is WireDtype.JSON and expected > limits.max_json_bytes:
        raise FrameError(
            f"JSON payload of {expected} bytes exceeds max_json_bytes={limits.max_json_bytes}", "too_large"
        )
    if hsize + expected > limits.max_frame_bytes:
        raise FrameError(
            f"{dtype.name.lower()} shape {shape} declares {hsize + expected} bytes, "
            f"above max_frame_bytes={limits.max_frame_bytes}",
            "too_large",
        )
    # The rest (payload size, flags, payload kind per type, JSON) is checked by Frame itself.
    return Frame(mtype, session, position, flags, dtype, shape, bytes(buf[hsize:]))


def tensor_frame(
    type: MessageType,
    tensor: torch.Tensor,
    wire_dtype: WireDtype | str,
    session: int,
    position: int,
    flags: int = 0,
) -> Frame:
    """A FORWARD/RESULT frame carrying ``tensor`` (e.g. a hidden state (rows, hidden)) as ``wire_dtype``."""
    wire_dtype = WireDtype.parse(wire_dtype)
    payload, shape = encode_tensor(tensor, wire_dtype)
    return Frame(type, session, position, flags, wire_dtype, shape, payload)


def frame_tensor(frame: Frame, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor a FORWARD/RESULT frame carries, as a new ``dtype`` tensor on ``device``."""
    if not frame.dtype.is_tensor:
        raise FrameError(f"{frame.type.name} frame carries {frame.dtype.name.lower()}, not a tensor", "bad_dtype")
    return decode_tensor(frame.payload, frame.dtype, frame.shape, dtype, device)


def _type_name(obj: object) -> str:
    """Short type name for error messages."""
    return type(obj).__name__


def _message_type(code: int) -> MessageType:
    try:
        return MessageType(code)
    except ValueError:
        allowed = ", ".join(f"{t.name}={t.value}" for t in MessageType)
        raise FrameError(f"message type {code!r} is unknown; allowed: {allowed}", "unknown_type") from None


def _wire_dtype(code: int) -> WireDtype:
    try:
        return WireDtype(code)
    except ValueError:
        why = "is unknown"
        allowed = ", ".join(f"{d.name.lower()}=0x{d.value:02x}" for d in WireDtype)
        raise FrameError(f"dtype code {code!r} {why}; allowed: {allowed}", "bad_dtype") from None


def _validate(frame: Frame) -> None:
    """Check every rule of the format that does not depend on limits; coerce enums, shape, payload."""
    mtype = _message_type(frame.type)
    dtype = _wire_dtype(frame.dtype)
    shape = tuple(frame.shape)
    payload = frame.payload if type(frame.payload) is bytes else bytes(frame.payload)
    for name in ("session", "position"):
        value = getattr(frame, name)
        if not isinstance(value, int) or not 0 <= value <= U32_MAX:
            raise FrameError(f"{name} must be a u32 (0..{U32_MAX}), got {value!r}", "bad_header")
    flags = frame.flags
    if not isinstance(flags, int) or flags & ~_KNOWN_FLAGS or flags < 0:
        raise FrameError(
            f"flags {flags!r}: only bits 0 (RESET) and 1 (LAST) are defined, the rest must be 0", "bad_flags"
        )
    if flags and mtype is not MessageType.FORWARD:
        raise FrameError(f"flags RESET and LAST are only allowed on FORWARD frames, got {mtype.name}", "bad_flags")
    if len(shape) > FORMAT_MAX_NDIM or not all(isinstance(d, int) and 0 <= d <= U32_MAX for d in shape):
        raise FrameError(f"shape {shape}: at most {FORMAT_MAX_NDIM} dims, each a u32", "bad_shape")
    if dtype not in _ALLOWED_DTYPES[mtype]:
        allowed = ", ".join(sorted(d.name.lower() for d in _ALLOWED_DTYPES[mtype]))
        raise FrameError(f"{mtype.name} frames carry {allowed}, got {dtype.name.lower()}", "bad_dtype")
    if frame.position and not dtype.is_tensor:
        raise FrameError(f"position must be 0 on a {mtype.name} frame, got {frame.position}", "bad_header")
    expected = payload_size(dtype, shape)
    if len(payload) != expected:
        raise FrameError(
            f"{dtype.name.lower()} shape {shape} needs a {expected}-byte payload, got {len(payload)} bytes",
            "size_mismatch",
        )
    if dtype is WireDtype.JSON:
        _parse_json(payload, mtype)
    # Frozen dataclass: coerce through object.__setattr__ (ints -> enums, lists -> tuples).
    object.__setattr__(frame, "type", mtype)
    object.__setattr__(frame, "dtype", dtype)
    object.__setattr__(frame, "shape", shape)
    object.__setattr__(frame, "payload", payload)


def _parse_json(payload: bytes, mtype: MessageType) -> dict[str, Any]:
    """The JSON object in ``payload``; FrameError("bad_json") for anything else."""
    try:
        # Strict UTF-8 (no BOM), no NaN/Infinity literals and no float that overflows to inf.
        body = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FrameError(f"{mtype.name} payload is not valid UTF-8 JSON: {exc}", "bad_json") from None
    if not isinstance(body, dict):
        raise FrameError(f"{mtype.name} payload must be a JSON object, got {_type_name(body)}", "bad_json")
    if mtype is MessageType.ERROR and not (isinstance(body.get("code"), str) and isinstance(body.get("message"), str)):
        raise FrameError(f'ERROR payload must be {{"code": str, "message": str}}, got {body!r:.200}', "bad_json")
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value

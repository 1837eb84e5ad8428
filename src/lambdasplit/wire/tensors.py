"""Tensor <-> payload bytes for each wire dtype (docs/wire-format.md, "Tensor payloads").

Raw dtypes (float32, float16, bfloat16) are the tensor's little-endian bytes, row-major. QINT8 is
the paper's per-token affine quantization: each row (the last dim; for a hidden state of shape
(rows, hidden) one row per token) gets its own ``offset`` (row min) and ``scale`` ((max-min)/255):

    payload = rows*hidden uint8 codes q | rows float32 scale | rows float32 offset
    x ≈ offset + scale * q,  |x - x̂| <= scale/2 (plus float32 rounding)

Everything is vectorised in torch: no Python loop ever touches an element.
"""

from __future__ import annotations

import math
import sys
from enum import IntEnum

import torch

from lambdasplit.errors import ConfigError, FrameError


class WireDtype(IntEnum):
    """The header's dtype byte: what the payload is.

    NONE and JSON describe control payloads; the others are tensor encodings (``is_tensor``).
    Codes 0x11..0x13 are reserved for packed INT6/INT4/INT2 and rejected by this version.
    """

    NONE = 0x00
    FLOAT32 = 0x01
    FLOAT16 = 0x02
    BFLOAT16 = 0x03
    QINT8 = 0x10
    JSON = 0x20

    @property
    def is_tensor(self) -> bool:
        """True for the dtypes that carry a tensor."""
        return self in _TENSOR_DTYPES

    @classmethod
    def parse(cls, value: WireDtype | str | torch.dtype) -> WireDtype:
        """The tensor wire dtype named by ``value``: "float16", "fp16", "bf16", "int8", torch.float16, ...

        Raises ConfigError listing the allowed names.
        """
        if isinstance(value, WireDtype) and value.is_tensor:
            return value
        if isinstance(value, torch.dtype) and value in _FROM_TORCH:
            return _FROM_TORCH[value]
        if isinstance(value, str) and value.strip().lower() in _ALIASES:
            return _ALIASES[value.strip().lower()]
        raise ConfigError(f"unknown wire dtype {value!r}; allowed: {', '.join(sorted(_ALIASES))}")


_TENSOR_DTYPES = frozenset({WireDtype.FLOAT32, WireDtype.FLOAT16, WireDtype.BFLOAT16, WireDtype.QINT8})
_ALIASES = {
    **dict.fromkeys(("float32", "fp32", "f32"), WireDtype.FLOAT32),
    **dict.fromkeys(("float16", "fp16", "f16", "half"), WireDtype.FLOAT16),
    **dict.fromkeys(("bfloat16", "bf16"), WireDtype.BFLOAT16),
    **dict.fromkeys(("qint8", "int8", "q8"), WireDtype.QINT8),
}
_TORCH = {
    WireDtype.FLOAT32: torch.float32,
    WireDtype.FLOAT16: torch.float16,
    WireDtype.BFLOAT16: torch.bfloat16,
}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}
# Reserved codes get their own message: a peer sending them speaks a newer protocol, not garbage.
RESERVED_DTYPES = {0x11: "packed int6", 0x12: "packed int4", 0x13: "packed int2"}
# QINT8 sends two float32 per row: scale and offset.
_QPARAM_BYTES = 8
# torch tensors are in host byte order; the wire is little-endian.
_HOST_IS_LITTLE = sys.byteorder == "little"


def tensor_payload_size(wire_dtype: WireDtype, shape: tuple[int, ...]) -> int:
    """Exact payload size in bytes of a tensor of ``shape`` encoded as ``wire_dtype``.

    Pure integer arithmetic on the declared shape (Python ints never overflow), so the decoder can
    compare it with the received size and the limits before allocating anything.
    """
    if wire_dtype is WireDtype.QINT8:
        if not shape:
            raise FrameError("a qint8 tensor needs at least 1 dim (rows are the last dim), got shape ()", "bad_shape")
        rows = math.prod(shape[:-1])
        return rows * shape[-1] + rows * _QPARAM_BYTES
    if wire_dtype in _TORCH:
        return math.prod(shape) * _TORCH[wire_dtype].itemsize
    raise FrameError(f"wire dtype {wire_dtype.name.lower()} does not carry a tensor", "bad_dtype")


def encode_tensor(tensor: torch.Tensor, wire_dtype: WireDtype | str) -> tuple[bytes, tuple[int, ...]]:
    """Encode a float tensor of any shape and device as (payload bytes, shape).

    Raises FrameError("non_finite") if the tensor (after conversion to the wire dtype: 1e5 is
    finite in float32 but inf in float16) holds NaN or Inf: the peer would reject it anyway.
    """
    wire_dtype = WireDtype.parse(wire_dtype)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ConfigError(f"encode_tensor needs a floating-point torch.Tensor, got {got}")
    tensor = tensor.detach()
    shape = tuple(tensor.shape)
    if wire_dtype is WireDtype.QINT8:
        return _encode_qint8(tensor, shape), shape
    wire = tensor.to(_TORCH[wire_dtype])
    if not _all_finite(wire):
        raise FrameError(_non_finite_message(tensor, wire, "encoding", wire_dtype), "non_finite")
    return _to_le_bytes(wire), shape


def decode_tensor(
    payload: bytes,
    wire_dtype: WireDtype | str,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Decode a payload into a new tensor of ``shape`` in compute ``dtype`` on ``device``.

    The result never shares memory with ``payload``. Raises FrameError for a payload whose size does
    not match the shape ("size_mismatch") and for NaN/Inf in the result or in QINT8's scale/offset
    ("non_finite"); ConfigError for a non-float compute dtype.
    """
    wire_dtype = WireDtype.parse(wire_dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"the compute dtype must be a floating-point torch.dtype, got {dtype!r}")
    expected = tensor_payload_size(wire_dtype, shape)
    if len(payload) != expected:
        raise FrameError(
            f"{wire_dtype.name.lower()} tensor of shape {shape} needs a {expected}-byte payload, "
            f"got {len(payload)} bytes",
            "size_mismatch",
        )
    if math.prod(shape) == 0:
        try:
            return torch.empty(shape, dtype=dtype, device=device)
        except RuntimeError as exc:  # e.g. (2**24, 2**24, 2**24, 0): torch's stride arithmetic overflows
            raise FrameError(f"empty tensor shape {shape} cannot be represented: {exc}", "bad_shape") from None
    if wire_dtype is WireDtype.QINT8:
        wire = _decode_qint8(payload, shape, device)
    else:
        wire = _from_le_bytes(payload, _TORCH[wire_dtype]).reshape(shape)
    # `wire` is already a private copy (never aliasing the payload), so `.to` may return it as is.
    out = wire.to(device=device, dtype=dtype)
    if not _all_finite(out):
        raise FrameError(_non_finite_message(wire, out, "decoding", wire_dtype), "non_finite")
    return out


def _encode_qint8(tensor: torch.Tensor, shape: tuple[int, ...]) -> bytes:
    """QINT8 payload of ``tensor``: (rows, hidden) uint8 codes, then rows scales, then rows offsets."""
    if not shape:
        raise FrameError("a qint8 tensor needs at least 1 dim (rows are the last dim), got shape ()", "bad_shape")
    hidden, rows = shape[-1], math.prod(shape[:-1])
    # float32 throughout: exact for float16/bfloat16 inputs, and the decoder computes in float32.
    x = tensor.to(torch.float32).reshape(rows, hidden)
    if hidden == 0:
        lo = hi = torch.zeros(rows, dtype=torch.float32, device=x.device)
    else:
        lo, hi = torch.aminmax(x, dim=1)
    scale = (hi - lo).div_(255)
    # NaN/Inf anywhere in a row makes its min or max, hence its scale, non-finite: the parameter
    # check doubles as the input check without another pass over the elements.
    if not _qparams_finite(scale, lo):
        if not bool(torch.isfinite(x).all()):
            raise FrameError(_non_finite_message(tensor, x, "encoding", WireDtype.QINT8), "non_finite")
        _raise_bad_qparams(scale, lo, "encoding")
    # A constant row has scale 0 and x - lo == 0: dividing by 1 there codes it as 0 (decoding to
    # the offset exactly) without a NaN from 0/0. Not a clamp to some tiny value: rows spanning
    # less than 255 * float32.tiny (3e-36) have subnormal scales and must divide by them.
    safe = torch.where(scale > 0, scale, 1.0)
    q = (x - lo[:, None]).div_(safe[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return _to_le_bytes(q) + _to_le_bytes(torch.cat((scale, lo)))


def _decode_qint8(payload: bytes, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Float32 tensor of ``shape`` from a QINT8 payload (size already checked)."""
    hidden, rows = shape[-1], math.prod(shape[:-1])
    n = rows * hidden
    # The parameters get their own small copy: at offset n they may not be 4-byte aligned.
    params = _from_le_bytes(payload[n:], torch.float32).to(device)
    scale, offset = params[:rows], params[rows:]
    if not _qparams_finite(scale, offset):
        _raise_bad_qparams(scale, offset, "decoding")
    q = _from_le_bytes(payload, torch.uint8)[:n].to(device).reshape(rows, hidden)
    return torch.addcmul(offset[:, None], q.to(torch.float32), scale[:, None]).reshape(shape)


def _qparams_finite(scale: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether every row's code range decodes to finite float32 values (shapes (rows,)).

    offset + 255*scale is NaN/Inf whenever scale or offset is, so one op checks all three.
    """
    return _all_finite(torch.add(offset, scale, alpha=255))


def _raise_bad_qparams(scale: torch.Tensor, offset: torch.Tensor, what: str) -> None:
    row = int((~torch.isfinite(torch.add(offset, scale, alpha=255))).nonzero()[0, 0])
    raise FrameError(
        f"{what} qint8: row {row} has scale {float(scale[row])!r} and offset {float(offset[row])!r}; "
        f"offset + 255*scale must be a finite float32 (rows spanning more than 3.4e38 cannot be coded)",
        "non_finite",
    )


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or ±Inf, in one reduction.

    NaN propagates into both min and max, and ±Inf is the min or the max; this is about 4x faster
    than ``torch.isfinite(t).all()`` on a (1, 576) tensor, which matters per token.
    """
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _non_finite_message(source: torch.Tensor, result: torch.Tensor, what: str, wire_dtype: WireDtype) -> str:
    """Error text naming how many values are NaN/Inf and whether converting ``source`` made them."""
    count = int((~torch.isfinite(result)).sum())
    cause = f" after conversion to {result.dtype} (out of range)" if bool(torch.isfinite(source).all()) else ""
    return (
        f"{what} a {wire_dtype.name.lower()} tensor of shape {tuple(result.shape)}: {count} non-finite "
        f"(NaN/Inf) values{cause}; only finite values are allowed"
    )


def _to_le_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as little-endian bytes, row-major."""
    if tensor.numel() == 0:  # an empty tensor may have zero strides, which .view(uint8) refuses
        return b""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    if not _HOST_IS_LITTLE:
        raw = swap_bytes(raw, tensor.element_size())
    return raw.numpy().tobytes()


def _from_le_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A new 1-D CPU tensor of ``dtype`` from little-endian bytes (size a multiple of its itemsize)."""
    if not data:  # torch.frombuffer refuses empty buffers
        return torch.empty(0, dtype=dtype)
    # bytearray: a private, writable copy. torch.frombuffer on read-only bytes warns, and a tensor
    # aliasing immutable bytes would be a trap for whoever writes to it in place.
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if not _HOST_IS_LITTLE:
        raw = swap_bytes(raw, dtype.itemsize)
    return raw.view(dtype)


def swap_bytes(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Reverse the byte order of every ``itemsize``-byte item of a 1-D uint8 tensor (big-endian hosts)."""
    if itemsize == 1:
        return raw
    return raw.reshape(-1, itemsize).flip(1).reshape(-1)

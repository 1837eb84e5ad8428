"""Tensor <-> payload bytes for each wire dtype (docs/wire-format.md, "Tensor payloads").

Raw dtypes (float32, float16, bfloat16) are the tensor's little-endian bytes, row-major. QINT8, QINT6,
QINT4 and QINT2 are the paper's per-token affine quantization with b = 8, 6, 4 or 2 bits: each row (the
last dim; for a hidden state of shape (rows, hidden) one row per token) gets its own ``offset`` (row
min) and ``scale`` ((max-min)/(2^b - 1)):

    payload = packed codes q | rows float32 scale | rows float32 offset
    x ≈ offset + scale * q,  |x - x̂| <= scale/2 (plus float32 rounding)

Codes below 8 bits are packed: groups of g codes (b=6: 4 codes in 3 bytes; b=4: 2 in 1; b=2: 4 in 1)
form one little-endian integer, code i of the group at bit b*i; the last group is zero-padded.

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
    """

    NONE = 0x00
    FLOAT32 = 0x01
    FLOAT16 = 0x02
    BFLOAT16 = 0x03
    QINT8 = 0x10
    QINT6 = 0x11
    QINT4 = 0x12
    QINT2 = 0x13
    JSON = 0x20

    @property
    def bits(self) -> int | None:
        """Bits per code of an affine-quantized dtype (8, 6, 4, 2), else None."""
        return _BITS.get(self)

    @property
    def is_tensor(self) -> bool:
        """True for the dtypes that carry a tensor."""
        return self in _TENSOR_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype of a raw payload (float32, float16, bfloat16); None for quantized and control dtypes."""
        return _TORCH.get(self)

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


_BITS = {WireDtype.QINT8: 8, WireDtype.QINT6: 6, WireDtype.QINT4: 4, WireDtype.QINT2: 2}
_TENSOR_DTYPES = frozenset({WireDtype.FLOAT32, WireDtype.FLOAT16, WireDtype.BFLOAT16, *_BITS})
_ALIASES = {
    **dict.fromkeys(("float32", "fp32", "f32"), WireDtype.FLOAT32),
    **dict.fromkeys(("float16", "fp16", "f16", "half"), WireDtype.FLOAT16),
    **dict.fromkeys(("bfloat16", "bf16"), WireDtype.BFLOAT16),
    **dict.fromkeys(("qint8", "int8", "q8"), WireDtype.QINT8),
    **dict.fromkeys(("qint6", "int6", "q6"), WireDtype.QINT6),
    **dict.fromkeys(("qint4", "int4", "q4"), WireDtype.QINT4),
    **dict.fromkeys(("qint2", "int2", "q2"), WireDtype.QINT2),
}
_TORCH = {
    WireDtype.FLOAT32: torch.float32,
    WireDtype.FLOAT16: torch.float16,
    WireDtype.BFLOAT16: torch.bfloat16,
}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}
# Quantized dtypes send two float32 per row: scale and offset.
_QPARAM_BYTES = 8
# torch tensors are in host byte order; the wire is little-endian.
_HOST_IS_LITTLE = sys.byteorder == "little"


def tensor_payload_size(wire_dtype: WireDtype, shape: tuple[int, ...]) -> int:
    """Exact payload size in bytes of a tensor of ``shape`` encoded as ``wire_dtype``.

    Pure integer arithmetic on the declared shape (Python ints never overflow), so the decoder can
    compare it with the received size and the limits before allocating anything.
    """
    bits = wire_dtype.bits
    if bits is not None:
        if not shape:
            name = wire_dtype.name.lower()
            raise FrameError(f"a {name} tensor needs at least 1 dim (rows are the last dim), got shape ()", "bad_shape")
        rows = math.prod(shape[:-1])
        return packed_size(rows * shape[-1], bits) + rows * _QPARAM_BYTES
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
    if wire_dtype.bits is not None:
        return _encode_affine(tensor, shape, wire_dtype), shape
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
    not match the shape ("size_mismatch") and for NaN/Inf in the result or in a quantized scale/offset
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
    if wire_dtype.bits is not None:
        wire = _decode_affine(payload, shape, device, wire_dtype)
    else:
        wire = _from_le_bytes(payload, _TORCH[wire_dtype]).reshape(shape)
    # `wire` is already a private copy (never aliasing the payload), so `.to` may return it as is.
    out = wire.to(device=device, dtype=dtype)
    if not _all_finite(out):
        raise FrameError(_non_finite_message(wire, out, "decoding", wire_dtype), "non_finite")
    return out


#: Codes per packed group and bytes per group, by bits per code: a group fills whole bytes.
_GROUPS = {8: (1, 1), 6: (4, 3), 4: (2, 1), 2: (4, 1)}


def packed_size(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` each, packed in groups (the last one zero-padded)."""
    codes, nbytes = _GROUPS[bits]
    return -(-n // codes) * nbytes


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes of the codes ``q`` (n,) uint8 < 2**bits: each group of codes is one little-endian
    integer with code i at bit ``bits * i``."""
    codes, nbytes = _GROUPS[bits]
    if codes == 1:
        return q
    groups = -(-q.numel() // codes)
    padded = torch.zeros(groups * codes, dtype=torch.int32, device=q.device)
    padded[: q.numel()] = q
    shifts = torch.arange(codes, dtype=torch.int32, device=q.device) * bits
    value = (padded.reshape(groups, codes) << shifts).sum(dim=1, dtype=torch.int32)  # (groups,), < 2**24
    out = (value[:, None] >> (torch.arange(nbytes, dtype=torch.int32, device=q.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack_codes(data: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The first ``n`` codes (int32) of packed ``data`` (uint8): the inverse of ``pack_codes``."""
    codes, nbytes = _GROUPS[bits]
    if codes == 1:
        return data[:n].to(torch.int32)
    groups = data.reshape(-1, nbytes).to(torch.int32)
    value = (groups << (torch.arange(nbytes, dtype=torch.int32, device=data.device) * 8)).sum(dim=1, dtype=torch.int32)
    shifts = torch.arange(codes, dtype=torch.int32, device=data.device) * bits
    return ((value[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]


def _encode_affine(tensor: torch.Tensor, shape: tuple[int, ...], wire_dtype: WireDtype) -> bytes:
    """A quantized payload of ``tensor``: packed codes, then rows scales, then rows offsets."""
    bits = wire_dtype.bits
    assert bits is not None
    if not shape:
        name = wire_dtype.name.lower()
        raise FrameError(f"a {name} tensor needs at least 1 dim (rows are the last dim), got shape ()", "bad_shape")
    levels = (1 << bits) - 1
    hidden, rows = shape[-1], math.prod(shape[:-1])
    # float32 throughout: exact for float16/bfloat16 inputs, and the decoder computes in float32.
    x = tensor.to(torch.float32).reshape(rows, hidden)
    if hidden == 0:
        lo = hi = torch.zeros(rows, dtype=torch.float32, device=x.device)
    else:
        lo, hi = torch.aminmax(x, dim=1)
    scale = (hi - lo).div_(levels)
    # NaN/Inf anywhere in a row makes its min or max, hence its scale, non-finite: the parameter
    # check doubles as the input check without another pass over the elements.
    if not _qparams_finite(scale, lo, levels):
        if not bool(torch.isfinite(x).all()):
            raise FrameError(_non_finite_message(tensor, x, "encoding", wire_dtype), "non_finite")
        _raise_bad_qparams(scale, lo, "encoding", wire_dtype)
    # A constant row has scale 0 and x - lo == 0: dividing by 1 there codes it as 0 (decoding to
    # the offset exactly) without a NaN from 0/0. Not a clamp to some tiny value: rows spanning
    # less than 255 * float32.tiny (3e-36) have subnormal scales and must divide by them.
    safe = torch.where(scale > 0, scale, 1.0)
    q = (x - lo[:, None]).div_(safe[:, None]).round_().clamp_(0, levels).to(torch.uint8)
    return _to_le_bytes(pack_codes(q.reshape(-1), bits)) + _to_le_bytes(torch.cat((scale, lo)))


def _decode_affine(
    payload: bytes, shape: tuple[int, ...], device: torch.device | str, wire_dtype: WireDtype
) -> torch.Tensor:
    """Float32 tensor of ``shape`` from a quantized payload (size already checked)."""
    bits = wire_dtype.bits
    assert bits is not None
    hidden, rows = shape[-1], math.prod(shape[:-1])
    n = rows * hidden
    packed = packed_size(n, bits)
    # The parameters get their own small copy: at offset `packed` they may not be 4-byte aligned.
    params = _from_le_bytes(payload[packed:], torch.float32).to(device)
    scale, offset = params[:rows], params[rows:]
    levels = (1 << bits) - 1
    if not _qparams_finite(scale, offset, levels):
        _raise_bad_qparams(scale, offset, "decoding", wire_dtype)
    q = unpack_codes(_from_le_bytes(payload, torch.uint8)[:packed].to(device), n, bits).reshape(rows, hidden)
    return torch.addcmul(offset[:, None], q.to(torch.float32), scale[:, None]).reshape(shape)


def _qparams_finite(scale: torch.Tensor, offset: torch.Tensor, levels: int) -> bool:
    """Whether every row's code range decodes to finite float32 values (shapes (rows,)).

    offset + levels*scale is NaN/Inf whenever scale or offset is, so one op checks all three.
    """
    return _all_finite(torch.add(offset, scale, alpha=levels))


def _raise_bad_qparams(scale: torch.Tensor, offset: torch.Tensor, what: str, wire_dtype: WireDtype) -> None:
    levels = (1 << (wire_dtype.bits or 8)) - 1
    row = int((~torch.isfinite(torch.add(offset, scale, alpha=levels))).nonzero()[0, 0])
    raise FrameError(
        f"{what} {wire_dtype.name.lower()}: row {row} has scale {float(scale[row])!r} and offset "
        f"{float(offset[row])!r}; offset + {levels}*scale must be a finite float32 (rows spanning more than "
        "3.4e38 cannot be coded)",
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

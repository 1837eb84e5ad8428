"""Tensor payloads: exact raw round trips, QINT8 error bounds and layout, non-finite rejection.

Payload layouts are checked with numpy against the spec (little-endian, row-major; QINT8 codes then
float32 scales then float32 offsets), independently of the torch code that produces them.
"""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lambdasplit.errors import ConfigError, FrameError
from lambdasplit.wire import (
    MessageType,
    WireDtype,
    decode_frame,
    decode_tensor,
    encode_frame,
    encode_tensor,
    frame_tensor,
    tensor_frame,
)
from lambdasplit.wire.tensors import pack_codes, packed_size, swap_bytes, tensor_payload_size, unpack_codes

ROUND = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RAW = {WireDtype.FLOAT32: torch.float32, WireDtype.FLOAT16: torch.float16, WireDtype.BFLOAT16: torch.bfloat16}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@st.composite
def raw_tensors(draw: st.DrawFn) -> tuple[WireDtype, torch.Tensor]:
    """A finite tensor already in a raw wire dtype, with hypothesis' edge values (±0, subnormals, max)."""
    wire = draw(st.sampled_from(list(RAW)))
    width = 16 if wire is WireDtype.FLOAT16 else 32
    # bfloat16 has float32's range but rounds 3.39e38+ up to inf: stay below it.
    bound = float(np.float32(3e38)) if wire is WireDtype.BFLOAT16 else None
    elements = st.floats(
        width=width, allow_nan=False, allow_infinity=False, min_value=bound and -bound, max_value=bound
    )
    array = draw(hnp.arrays(np.float16 if width == 16 else np.float32, draw(shapes), elements=elements))
    return wire, torch.from_numpy(array.copy()).to(RAW[wire])


@ROUND
@given(raw_tensors())
def test_raw_dtypes_round_trip_bit_exactly(case: tuple[WireDtype, torch.Tensor]):
    wire, tensor = case
    payload, shape = encode_tensor(tensor, wire)
    assert shape == tuple(tensor.shape)
    assert len(payload) == tensor.numel() * tensor.element_size()
    same = decode_tensor(payload, wire, shape, dtype=tensor.dtype)
    assert same.dtype == tensor.dtype and same.shape == tensor.shape
    view = INT_VIEW[tensor.dtype]
    assert torch.equal(same.view(view), tensor.view(view))  # bit patterns: -0.0 stays -0.0
    assert torch.equal(decode_tensor(payload, wire, shape), tensor.float())


def test_raw_payload_is_little_endian_row_major():
    t = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert encode_tensor(t, "float32")[0] == struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)
    assert encode_tensor(t, "float16")[0] == np.array([1.0, -2.0, 0.5, 3.0], dtype="<f2").tobytes()
    # bfloat16 is the top half of the float32 pattern: 1.0 = 0x3f80, sent low byte first.
    assert encode_tensor(torch.tensor([1.0]), "bf16")[0] == b"\x80\x3f"


def test_swap_bytes_reverses_each_item():
    raw = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8)
    assert swap_bytes(raw, 4).tolist() == [4, 3, 2, 1, 8, 7, 6, 5]
    assert swap_bytes(raw, 2).tolist() == [2, 1, 4, 3, 6, 5, 8, 7]
    assert swap_bytes(raw, 1) is raw


def test_encoding_converts_any_float_tensor_and_decoding_any_compute_dtype():
    t = torch.randn(3, 8, dtype=torch.float64)
    payload, shape = encode_tensor(t, "fp16")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        out = decode_tensor(payload, WireDtype.FLOAT16, shape, dtype=dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out, t.half().to(dtype))


def test_decoded_tensor_owns_writable_memory():
    payload, shape = encode_tensor(torch.ones(2, 3), "float32")
    out = decode_tensor(payload, WireDtype.FLOAT32, shape)
    out.add_(1)  # would corrupt the payload if it aliased it
    assert decode_tensor(payload, WireDtype.FLOAT32, shape).eq(1).all()


# --- QINT8 ------------------------------------------------------------------------------------


def qint8_layout(payload: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, hidden), scale (rows,), offset (rows,)) read with numpy, straight from the spec."""
    hidden, rows = shape[-1], math.prod(shape[:-1])
    n = rows * hidden
    codes = np.frombuffer(payload, np.uint8, count=n).reshape(rows, hidden)
    params = np.frombuffer(payload[n:], "<f4")
    return codes, params[:rows], params[rows:]


@st.composite
def qint8_tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6))
    # Rows must span less than float32's max (3.4e38); +-2**122 (5e36) keeps hypothesis' extremes.
    elements = st.floats(-(2.0**122), 2.0**122, width=32, allow_nan=False, allow_infinity=False)
    if draw(st.booleans()):  # hidden-state-like values, not only hypothesis' extremes
        elements = st.floats(-8, 8, width=32)
    return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=elements)).copy())


@ROUND
@given(qint8_tensors())
@example(torch.tensor([2.6578e-36, 0.0]))  # a subnormal scale: must not be clamped to a normal one
@example(torch.tensor([[0.0, -1.0]]))  # offset + 255 * scale lands exactly on the row max
def test_qint8_is_within_half_a_step_of_each_row(tensor: torch.Tensor):
    payload, shape = encode_tensor(tensor, "qint8")
    codes, scale, offset = qint8_layout(payload, shape)
    x = tensor.reshape(codes.shape).double().numpy()
    # The spec: offset is the row min, scale (max - min) / 255 rounded to float32.
    if x.size:
        assert np.array_equal(offset, x.min(axis=1).astype(np.float32))
        np.testing.assert_allclose(scale, (x.max(axis=1) - x.min(axis=1)) / 255, rtol=1e-6, atol=1e-44)
    out = decode_tensor(payload, WireDtype.QINT8, shape).reshape(codes.shape).double().numpy()
    # Half a step, plus float32 rounding of offset + scale * q.
    tol = scale[:, None].astype(np.float64) * (0.5 + 1e-4) + 2.5e-7 * np.abs(x) + 1e-37
    assert np.all(np.abs(out - x) <= tol)
    # The decoder computes offset + scale * q from the documented layout, up to float32 rounding
    # (one or two roundings, depending on whether the CPU fuses the multiply-add).
    terms = offset[:, None].astype(np.float64), scale[:, None].astype(np.float64) * codes
    assert np.all(np.abs(out - (terms[0] + terms[1])) <= 2.5e-7 * (np.abs(terms[0]) + terms[1]) + 1e-37)


def test_qint8_gives_each_row_its_own_scale():
    tensor = torch.stack([torch.linspace(-1e-3, 1e-3, 576), torch.linspace(-1e3, 1e3, 576)])
    payload, shape = encode_tensor(tensor, "qint8")
    assert len(payload) == 2 * 576 + 2 * 8
    codes, scale, offset = qint8_layout(payload, shape)
    assert codes[:, 0].tolist() == [0, 0] and codes[:, -1].tolist() == [255, 255]
    np.testing.assert_allclose(scale, [2e-3 / 255, 2e3 / 255], rtol=1e-6)
    assert offset.tolist() == tensor[:, 0].tolist()
    err = (decode_tensor(payload, WireDtype.QINT8, shape) - tensor).abs().amax(dim=1)
    assert err[0] < 4e-6 and err[1] < 4.0


def test_qint8_constant_rows_decode_exactly_without_dividing_by_zero():
    tensor = torch.tensor([[2.5, 2.5, 2.5], [0.0, 0.0, 0.0], [-7.0, -7.0, -7.0]])
    payload, shape = encode_tensor(tensor, "qint8")
    codes, scale, offset = qint8_layout(payload, shape)
    assert not codes.any() and not scale.any() and offset.tolist() == [2.5, 0.0, -7.0]
    assert torch.equal(decode_tensor(payload, WireDtype.QINT8, shape), tensor)


def test_qint8_frame_of_a_hidden_state():
    hidden = torch.randn(1, 576)
    data = encode_frame(tensor_frame(MessageType.FORWARD, hidden, "int8", 1, 0))
    assert len(data) == 24 + 576 + 8
    out = frame_tensor(decode_frame(data))
    assert (out - hidden).abs().max() <= (hidden.max() - hidden.min()) / 255 * 0.5001


@pytest.mark.parametrize(("bits", "per_group"), [(8, (1, 1)), (6, (4, 3)), (4, (2, 1)), (2, (4, 1))])
@given(n=st.integers(0, 70), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_packing_round_trips_and_fills_whole_bytes(bits: int, per_group: tuple[int, int], n: int, seed: int):
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes, bits)
    group, nbytes = per_group
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == -(-n // group) * nbytes
    assert torch.equal(unpack_codes(packed, n, bits), codes.to(torch.int32))


def test_packed_bit_layout_is_little_endian_within_a_group():
    # int2: codes 1, 2, 3, 0 -> 0b00_11_10_01; int4: 0xA then 0x5 -> 0x5A; int6: 4 codes in 3 bytes.
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([0xA, 0x5, 0x3], dtype=torch.uint8), 4).tolist() == [0x5A, 0x03]
    value = 1 | 2 << 6 | 63 << 12 | 5 << 18
    packed = pack_codes(torch.tensor([1, 2, 63, 5], dtype=torch.uint8), 6).tolist()
    assert packed == [value & 0xFF, value >> 8 & 0xFF, value >> 16]


@pytest.mark.parametrize("wire", ["qint6", "qint4", "qint2"])
@given(tensor=qint8_tensors())
@settings(max_examples=30, deadline=None)
def test_packed_dtypes_are_within_half_a_step_and_send_fewer_bytes(wire: str, tensor: torch.Tensor):
    bits = WireDtype.parse(wire).bits
    assert bits is not None
    payload, shape = encode_tensor(tensor, wire)
    rows, hidden = math.prod(shape[:-1]), shape[-1]
    size = packed_size(rows * hidden, bits) + 8 * rows
    assert len(payload) == tensor_payload_size(WireDtype.parse(wire), shape) == size
    out = decode_tensor(payload, wire, shape)
    assert out.shape == tensor.shape
    if tensor.numel() == 0:
        return
    x = tensor.to(torch.float32).reshape(rows, hidden)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    step = (hi - lo) / ((1 << bits) - 1)
    slack = 1e-6 * x.abs().amax(dim=1, keepdim=True) + 1e-30  # float32 rounding of offset + scale * q
    assert bool(((out.reshape(rows, hidden) - x).abs() <= step[:, None] / 2 + slack).all())


def test_a_hidden_state_row_in_each_quantized_dtype():
    """(1, 576): 584 B at 8 bits, 440 at 6, 296 at 4, 152 at 2 (codes + 8 B of scale and offset)."""
    hidden = torch.randn(1, 576)
    sizes = {wire: len(encode_tensor(hidden, wire)[0]) for wire in ("int8", "int6", "int4", "int2")}
    assert sizes == {"int8": 584, "int6": 440, "int4": 296, "int2": 152}
    errors = []
    for wire in ("int8", "int6", "int4", "int2"):  # coarser codes, larger errors, all within half a step
        payload, shape = encode_tensor(hidden, wire)
        errors.append(float((decode_tensor(payload, wire, shape) - hidden).abs().max()))
    assert errors == sorted(errors)


def test_qint8_needs_a_last_dim():
    with pytest.raises(FrameError) as err:
        encode_tensor(torch.tensor(1.0), "qint8")
    assert err.value.code == "bad_shape"


# --- non-finite values -------------------------------------------------------------------------


@ROUND
@given(
    st.sampled_from(["float32", "float16", "bf16", "qint8", "qint6", "qint4", "qint2"]),
    st.integers(1, 700),
    st.data(),
    st.sampled_from([float("nan"), float("inf"), -float("inf")]),
)
def test_encoding_a_non_finite_tensor_raises(wire: str, n: int, data: st.DataObject, bad: float):
    tensor = torch.randn(1, n)
    tensor[0, data.draw(st.integers(0, n - 1))] = bad
    with pytest.raises(FrameError) as err:
        encode_tensor(tensor, wire)
    assert err.value.code == "non_finite"


def test_encoding_a_value_out_of_the_wire_range_raises_naming_the_conversion():
    with pytest.raises(FrameError, match="after conversion") as err:
        encode_tensor(torch.tensor([[1.0, 1e5]]), "float16")
    assert err.value.code == "non_finite"
    with pytest.raises(FrameError, match="row 1") as err:  # max - min overflows float32
        encode_tensor(torch.tensor([[0.0, 1.0], [-3e38, 3e38]]), "qint8")
    assert err.value.code == "non_finite"


@pytest.mark.parametrize(
    ("wire", "payload", "shape"),
    [
        (WireDtype.FLOAT32, struct.pack("<3f", 1.0, float("inf"), 0.0), (3,)),
        (WireDtype.FLOAT16, np.array([0, np.nan], "<f2").tobytes(), (1, 2)),
        (WireDtype.BFLOAT16, b"\x80\x3f\xc0\x7f", (2,)),  # 1.0, NaN
        (WireDtype.QINT8, bytes([0, 255]) + struct.pack("<2f", float("nan"), 0.0), (1, 2)),  # NaN scale
        (WireDtype.QINT8, bytes([0, 255]) + struct.pack("<2f", 1.0, float("-inf")), (1, 2)),  # -inf offset
        (WireDtype.QINT8, bytes([0, 255]) + struct.pack("<2f", 3e38, 3e38), (1, 2)),  # 3e38 + 255 * 3e38
    ],
)
def test_decoding_non_finite_values_raises(wire: WireDtype, payload: bytes, shape: tuple[int, ...]):
    with pytest.raises(FrameError) as err:
        decode_tensor(payload, wire, shape)
    assert err.value.code == "non_finite"


def test_decoding_into_a_narrower_compute_dtype_that_overflows_raises():
    payload, shape = encode_tensor(torch.tensor([1e5]), "float32")
    assert decode_tensor(payload, WireDtype.FLOAT32, shape).item() == 1e5
    with pytest.raises(FrameError, match="after conversion") as err:
        decode_tensor(payload, WireDtype.FLOAT32, shape, dtype=torch.float16)
    assert err.value.code == "non_finite"


# --- shapes, sizes and arguments ---------------------------------------------------------------


@pytest.mark.parametrize("wire", ["float32", "float16", "bf16", "qint8", "qint6", "qint4", "qint2"])
@pytest.mark.parametrize("shape", [(0,), (0, 576), (3, 0), (2, 0, 4)])
def test_empty_tensors_round_trip(wire: str, shape: tuple[int, ...]):
    payload, got = encode_tensor(torch.empty(shape), wire)
    out = decode_tensor(payload, WireDtype.parse(wire), got)
    assert out.shape == shape


def test_payload_size_mismatch_raises():
    payload, shape = encode_tensor(torch.ones(2, 3), "qint8")
    for bad in (payload[:-1], payload + b"\x00"):
        with pytest.raises(FrameError) as err:
            decode_tensor(bad, WireDtype.QINT8, shape)
        assert err.value.code == "size_mismatch"


def test_wire_dtype_parse():
    assert WireDtype.parse("float16") is WireDtype.parse("FP16") is WireDtype.parse("half") is WireDtype.FLOAT16
    assert WireDtype.parse("bf16") is WireDtype.parse(torch.bfloat16) is WireDtype.BFLOAT16
    assert WireDtype.parse("int8") is WireDtype.parse("qint8") is WireDtype.QINT8
    assert WireDtype.parse(WireDtype.FLOAT32) is WireDtype.FLOAT32
    assert WireDtype.parse("int4") is WireDtype.parse("q4") is WireDtype.QINT4 and WireDtype.QINT4.bits == 4
    assert WireDtype.parse("int6").bits == 6 and WireDtype.parse("int2").bits == 2 and WireDtype.FLOAT16.bits is None
    for bad in ("int3", "json", WireDtype.JSON, WireDtype.NONE, torch.int8, None):
        with pytest.raises(ConfigError, match=r"allowed: .*float16") as err:
            WireDtype.parse(bad)  # type: ignore[arg-type]
        assert repr(bad) in str(err.value)


def test_raw_wire_dtypes_name_their_torch_dtype_and_no_other_does():
    assert [w.torch_dtype for w in (WireDtype.FLOAT32, WireDtype.FLOAT16, WireDtype.BFLOAT16)] == [
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ]
    assert all(WireDtype.parse(w.torch_dtype) is w for w in WireDtype if w.torch_dtype is not None)
    assert WireDtype.QINT8.torch_dtype is None and WireDtype.JSON.torch_dtype is None


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match=r"torch\.int64"):
        encode_tensor(torch.ones(2, dtype=torch.int64), "float32")
    with pytest.raises(ConfigError, match="list"):
        encode_tensor([1.0, 2.0], "float32")  # type: ignore[arg-type]
    payload, shape = encode_tensor(torch.ones(2), "float32")
    with pytest.raises(ConfigError, match="compute dtype"):
        decode_tensor(payload, WireDtype.FLOAT32, shape, dtype=torch.int32)


def test_hidden_state_codec_takes_microseconds():
    # Per-token cost: a (1, 576) float16 hidden state, encoded and decoded as whole frames.
    # Measured ~25 µs per round trip on 2 CPU cores; 1 ms is a loose bound that still catches
    # a Python loop over elements.
    hidden = torch.randn(1, 576).half()
    start = time.perf_counter()
    for _ in range(200):
        frame_tensor(decode_frame(encode_frame(tensor_frame(MessageType.FORWARD, hidden, "float16", 1, 0))))
    assert (time.perf_counter() - start) / 200 < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("wire", ["float32", "float16", "bf16", "qint8"])
def test_cuda_tensors_encode_and_decode_on_the_device(wire: str):
    hidden = torch.randn(3, 576, device="cuda")
    payload, shape = encode_tensor(hidden, wire)
    out = decode_tensor(payload, wire, shape, device="cuda")
    assert out.device.type == "cuda"
    ref = decode_tensor(encode_tensor(hidden.cpu(), wire)[0], wire, shape)
    # Raw dtypes are exact; QINT8 may differ by float rounding (GPU fused multiply-add), never by a step.
    atol = 1e-5 if wire == "qint8" else 0.0
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=atol)
    hidden[1, 7] = float("nan")
    with pytest.raises(FrameError) as err:
        encode_tensor(hidden, wire)
    assert err.value.code == "non_finite"

"""Frames: the header layout of docs/wire-format.md, round trips, and every FrameError code.

Crafted frames are built here with ``struct`` from the spec, independently of the codec, so a
change to the codec that breaks the documented bytes fails these tests.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambdasplit.errors import ConfigError, FrameError
from lambdasplit.wire import (
    HEADER_BYTES_FIXED,
    Frame,
    FrameFlags,
    FrameLimits,
    MessageType,
    WireDtype,
    decode_frame,
    encode_frame,
    frame_tensor,
    header_size,
    payload_size,
    tensor_frame,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONTROL_DTYPES = {
    MessageType.HELLO: [WireDtype.JSON],
    MessageType.WELCOME: [WireDtype.JSON],
    MessageType.OPEN: [WireDtype.JSON],
    MessageType.OPENED: [WireDtype.JSON],
    MessageType.CLOSE: [WireDtype.NONE, WireDtype.JSON],
    MessageType.CLOSED: [WireDtype.NONE, WireDtype.JSON],
    MessageType.PING: [WireDtype.NONE],
    MessageType.PONG: [WireDtype.NONE],
    MessageType.GENERATE: [WireDtype.JSON],
    MessageType.TEXT: [WireDtype.JSON],
    MessageType.ERROR: [WireDtype.JSON],
}
TENSOR_DTYPES = [WireDtype.FLOAT32, WireDtype.FLOAT16, WireDtype.BFLOAT16, WireDtype.QINT8]


def raw_frame(
    mtype: int = 5,
    dtype: int = 2,
    dims: tuple[int, ...] = (1, 2),
    payload: bytes = bytes(4),
    *,
    flags: int = 0,
    session: int = 1,
    position: int = 0,
    magic: bytes = b"\xce\x9b",
    version: int = 1,
    ndim: int | None = None,
) -> bytes:
    """A frame assembled straight from the spec's byte table (not from the codec)."""
    ndim = len(dims) if ndim is None else ndim
    fixed = magic + struct.pack("<BBBBHII", version, mtype, dtype, ndim, flags, session, position)
    return fixed + struct.pack(f"<{len(dims)}I", *dims) + payload


def hexdump(data: bytes) -> str:
    """``hexdump -C`` style lines, as used for the examples in docs/wire-format.md."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk[:8]) + "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{off:08x}  {hexes:<48}  |{text}|")
    return "\n".join(lines)


def json_frame(mtype: int, body: object, session: int = 0) -> bytes:
    data = json.dumps(body).encode()
    return raw_frame(mtype, 0x20, (len(data),), data, session=session)


# --- the documented bytes ---------------------------------------------------------------------

FORWARD_HEADER_HEX = "ce 9b 01 05 02 02 00 00 01 00 00 00 07 00 00 00 01 00 00 00 40 02 00 00"


def doc_examples() -> dict[str, bytes]:
    """The frames whose hex dumps docs/wire-format.md shows, built with the public API."""
    return {
        "forward_header": encode_frame(
            tensor_frame(MessageType.FORWARD, torch.zeros(1, 576), "float16", session=1, position=7)
        )[:24],
        "forward_small": encode_frame(
            tensor_frame(
                MessageType.FORWARD,
                torch.tensor([[1.0, -2.0, 0.5, 65504.0]]),
                "float16",
                session=1,
                position=0,
                flags=FrameFlags.RESET,
            )
        ),
        "result_qint8": encode_frame(
            tensor_frame(
                MessageType.RESULT,
                torch.tensor([[0.0, 1.0, 2.55], [-1.0, -1.0, -1.0]]),
                "qint8",
                session=1,
                position=3,
            )
        ),
        "hello": encode_frame(Frame.json(MessageType.HELLO, {"protocol": 1})),
        "ping": encode_frame(Frame(MessageType.PING)),
        "error": encode_frame(
            Frame.json(MessageType.ERROR, {"code": "bad_version", "message": "protocol version 2"}, session=0)
        ),
    }


def test_float16_hidden_state_frame_is_1176_bytes_with_the_documented_header():
    hidden = torch.randn(1, 576).half()
    data = encode_frame(tensor_frame(MessageType.FORWARD, hidden, "float16", session=1, position=7))
    assert len(data) == 1176 == 24 + 576 * 2
    assert data[:24] == bytes.fromhex(FORWARD_HEADER_HEX)
    assert data[24:] == hidden.numpy().astype("<f2").tobytes()
    # The per-token budget: <= 34 bytes of overhead per direction including WebSocket framing.
    assert len(data) - 1152 + 8 <= 34


def test_doc_shows_exactly_the_bytes_the_code_produces():
    doc = DOC.read_text(encoding="utf-8")
    assert FORWARD_HEADER_HEX in doc
    for name, data in doc_examples().items():
        assert hexdump(data) in doc, f"docs/wire-format.md lacks the hex dump of example {name!r}"


def test_header_layout_matches_the_spec_table():
    frame = Frame(MessageType.RESULT, 0xA1B2C3D4, 0x01020304, 0, WireDtype.FLOAT32, (3,), bytes(12))
    data = encode_frame(frame)
    assert data == raw_frame(6, 1, (3,), bytes(12), session=0xA1B2C3D4, position=0x01020304)
    assert header_size(0) == HEADER_BYTES_FIXED == 16
    assert header_size(2) == 24
    assert frame.nbytes == len(data) == 16 + 4 + 12


def test_codes_are_the_documented_ones():
    assert {t.name: t.value for t in MessageType} == {
        "HELLO": 1, "WELCOME": 2, "OPEN": 3, "OPENED": 4, "FORWARD": 5, "RESULT": 6,
        "CLOSE": 7, "CLOSED": 8, "PING": 9, "PONG": 10,
        "GENERATE": 11, "TEXT": 12, "STATE": 13, "GOAWAY": 14, "TREE": 15, "ERROR": 127,
    }  # fmt: skip
    assert {d.name: d.value for d in WireDtype} == {
        "NONE": 0, "FLOAT32": 1, "FLOAT16": 2, "BFLOAT16": 3, "QINT8": 0x10, "QINT6": 0x11, "QINT4": 0x12,
        "QINT2": 0x13, "JSON": 0x20,
    }  # fmt: skip
    assert FrameFlags.RESET == 1 and FrameFlags.LAST == 2


# --- round trips ------------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFF_FFFF)
json_text = st.text(st.characters(codec="utf-8"), max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(json_text, json_values, max_size=6)


@st.composite
def control_frames(draw: st.DrawFn) -> Frame:
    mtype = draw(st.sampled_from(sorted(CONTROL_DTYPES)))
    dtype = draw(st.sampled_from(CONTROL_DTYPES[mtype]))
    session = draw(u32)
    if dtype is WireDtype.NONE:
        return Frame(mtype, session)
    body = draw(json_objects)
    if mtype is MessageType.ERROR:
        body = {**body, "code": draw(json_text), "message": draw(json_text)}
    return Frame.json(mtype, body, session)


@st.composite
def tensor_frames(draw: st.DrawFn) -> Frame:
    mtype = draw(st.sampled_from([MessageType.FORWARD, MessageType.RESULT]))
    wire = draw(st.sampled_from(TENSOR_DTYPES))
    shape = draw(st.lists(st.integers(0, 6), min_size=1 if wire is WireDtype.QINT8 else 0, max_size=4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    tensor = torch.randn(shape, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
    flags = draw(st.sampled_from([0, FrameFlags.RESET, FrameFlags.LAST])) if mtype is MessageType.FORWARD else 0
    return tensor_frame(mtype, tensor, wire, draw(u32), draw(u32), flags)


frames = control_frames() | tensor_frames()


@ROUND
@given(frames)
def test_every_frame_round_trips(frame: Frame):
    data = encode_frame(frame)
    assert len(data) == frame.nbytes == header_size(len(frame.shape)) + payload_size(frame.dtype, frame.shape)
    again = decode_frame(data)
    assert again == frame
    assert isinstance(again.type, MessageType) and isinstance(again.dtype, WireDtype)
    assert encode_frame(again) == data


@ROUND
@given(st.sampled_from([t for t, kinds in CONTROL_DTYPES.items() if WireDtype.JSON in kinds]), json_objects, u32)
def test_json_bodies_round_trip(mtype: MessageType, body: dict, session: int):
    if mtype is MessageType.ERROR:
        body = {**body, "code": "x", "message": "y"}
    frame = decode_frame(encode_frame(Frame.json(mtype, body, session)))
    assert frame.json_body() == body
    assert frame.session == session and frame.position == 0 and frame.dtype is WireDtype.JSON


def test_decode_accepts_bytes_bytearray_and_memoryview():
    data = encode_frame(Frame.json(MessageType.OPEN, {"cache": True}))
    for buf in (data, bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        assert decode_frame(buf).json_body() == {"cache": True}


def test_frame_without_payload_has_empty_json_body():
    assert Frame(MessageType.CLOSE, session=3).json_body() == {}
    assert len(encode_frame(Frame(MessageType.PONG))) == 16


def test_wrong_payload_kind_accessors_raise_frame_error():
    tensor = tensor_frame(MessageType.RESULT, torch.ones(1, 2), "float32", 1, 0)
    with pytest.raises(FrameError) as err:
        tensor.json_body()
    assert err.value.code == "bad_dtype"
    with pytest.raises(FrameError) as err:
        frame_tensor(Frame.json(MessageType.HELLO, {}))
    assert err.value.code == "bad_dtype"


def test_frame_json_rejects_what_json_cannot_carry():
    with pytest.raises(ConfigError, match="dict"):
        Frame.json(MessageType.HELLO, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="finite float"):
        Frame.json(MessageType.HELLO, {"x": float("nan")})
    with pytest.raises(ConfigError):
        Frame.json(MessageType.HELLO, {"x": object()})


def test_constructing_an_invalid_frame_raises_so_every_frame_encodes():
    with pytest.raises(FrameError) as err:
        Frame(MessageType.PING, payload=b"x")
    assert err.value.code == "size_mismatch"
    with pytest.raises(FrameError) as err:
        Frame(MessageType.PING, session=2**32)
    assert err.value.code == "bad_header"
    with pytest.raises(FrameError) as err:
        Frame(MessageType.FORWARD, dtype=WireDtype.FLOAT32, shape=(1, 1, 1, 1, 1), payload=bytes(4))
    assert err.value.code == "bad_shape"


# --- every FrameError code from crafted bytes --------------------------------------------------

LIMITS = FrameLimits()
CRAFTED = [
    ("truncated", b"\xce\x9b\x01"),
    ("truncated", raw_frame(dims=(1, 2))[:20]),  # ndim 2 promises 24 header bytes
    ("bad_magic", raw_frame(magic=b"\xce\x9c")),
    ("bad_magic", b"GET / HTTP/1.1\r\nHost: x\r\n"),
    ("bad_version", raw_frame(version=2)),
    ("bad_version", raw_frame(version=0)),
    ("unknown_type", raw_frame(mtype=0)),
    ("unknown_type", raw_frame(mtype=16)),  # after TREE: unknown
    ("bad_dtype", raw_frame(dtype=0x07)),
    ("bad_dtype", raw_frame(dtype=0x14)),  # after the packed INT2 code: unknown
    ("bad_dtype", json_frame(5, {"a": 1})),  # FORWARD must carry a tensor
    ("bad_dtype", raw_frame(mtype=9, dtype=0x02)),  # PING carries nothing
    ("bad_dtype", raw_frame(mtype=1, dtype=0x00, dims=(), payload=b"")),  # HELLO needs JSON
    ("size_mismatch", raw_frame(payload=bytes(3))),
    ("size_mismatch", raw_frame(payload=bytes(5))),
    ("size_mismatch", raw_frame(dtype=0x10, dims=(2, 3), payload=bytes(6 + 8))),  # QINT8 lacks one row's params
    ("too_large", raw_frame(dims=(1 << 24, 1 << 24), payload=b"")),
    ("too_large", raw_frame(dims=(1, (1 << 24) + 1), payload=b"")),
    ("too_large", raw_frame(mtype=1, dtype=0x20, dims=(LIMITS.max_json_bytes + 1,), payload=b"{}")),
    ("bad_json", raw_frame(mtype=1, dtype=0x20, dims=(2,), payload=b"\xff}")),
    ("bad_json", raw_frame(mtype=1, dtype=0x20, dims=(2,), payload=b"{]")),
    ("bad_json", json_frame(1, [1, 2])),
    ("bad_json", raw_frame(mtype=1, dtype=0x20, dims=(9,), payload=b'{"x":NaN}')),
    ("bad_json", raw_frame(mtype=1, dtype=0x20, dims=(11,), payload=b'{"x":1e999}')),
    ("bad_json", raw_frame(mtype=1, dtype=0x20, dims=(0,), payload=b"")),
    ("bad_json", raw_frame(mtype=1, dtype=0x20, dims=(20001,), payload=b"[" * 20000 + b"]")),
    ("bad_json", json_frame(127, {"code": "x"})),  # ERROR needs code and message strings
    ("bad_json", json_frame(127, {"code": 1, "message": "m"})),
    ("bad_flags", raw_frame(flags=4)),
    ("bad_flags", raw_frame(flags=0x8000)),
    ("bad_flags", raw_frame(mtype=6, flags=1)),  # RESET on a RESULT
    ("bad_flags", raw_frame(mtype=6, flags=2)),  # LAST on a RESULT
    ("bad_shape", raw_frame(dims=(1, 1, 1, 1, 1), payload=bytes(2))),
    ("bad_shape", raw_frame(mtype=1, dtype=0x20, dims=(1, 2), payload=b"{}")),
    ("bad_shape", raw_frame(mtype=9, dtype=0x00, dims=(0,), payload=b"")),
    ("bad_shape", raw_frame(dtype=0x10, dims=(), payload=b"")),
    ("bad_header", raw_frame(mtype=9, dtype=0x00, dims=(), payload=b"", position=5)),
]


@pytest.mark.parametrize(("code", "data"), CRAFTED, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CRAFTED)])
def test_crafted_frame_raises_its_code(code: str, data: bytes):
    with pytest.raises(FrameError) as err:
        decode_frame(data)
    assert err.value.code == code, str(err.value)


def test_oversized_frame_is_too_large_and_non_finite_is_caught_on_tensor_access():
    with pytest.raises(FrameError) as err:
        decode_frame(bytes(101), FrameLimits(max_frame_bytes=100, max_json_bytes=50))
    assert err.value.code == "too_large"
    nan = raw_frame(dtype=0x01, dims=(1, 2), payload=struct.pack("<2f", 1.0, float("nan")))
    with pytest.raises(FrameError) as err:
        frame_tensor(decode_frame(nan))
    assert err.value.code == "non_finite"


def test_error_messages_name_the_bad_value_and_what_is_allowed():
    cases = [
        (raw_frame(version=7), ["7", "1"]),
        (raw_frame(mtype=42), ["42", "FORWARD=5"]),
        (raw_frame(dtype=0x14), ["20", "float16=0x02", "qint4=0x12"]),
        (raw_frame(flags=4), ["4", "RESET", "LAST"]),
        (raw_frame(payload=bytes(3)), ["4-byte", "3 bytes"]),
        (raw_frame(dims=(1 << 24, 1 << 24), payload=b""), [str(LIMITS.max_frame_bytes)]),
    ]
    for data, needles in cases:
        with pytest.raises(FrameError) as err:
            decode_frame(data)
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))


def test_huge_declared_shape_is_rejected_before_any_allocation():
    # 24 bytes claiming a 4 * 2**48-byte float32 tensor; 2**24 is within max_dim, so only the
    # declared-size check can stop it, and it must do so without allocating from the claim.
    data = raw_frame(dtype=0x01, dims=(1 << 24, 1 << 24), payload=b"")
    tracemalloc.start()
    try:
        with pytest.raises(FrameError) as err:
            decode_frame(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.code == "too_large"
    assert peak < 64 * 1024


def test_empty_tensor_with_unrepresentable_shape_is_a_frame_error():
    frame = decode_frame(raw_frame(dtype=0x01, dims=(1 << 24, 1 << 24, 1 << 24, 0), payload=b""))
    with pytest.raises(FrameError) as err:
        frame_tensor(frame)
    assert err.value.code == "bad_shape"


# --- fuzzing: nothing but FrameError, ever ----------------------------------------------------


def decode_everything(data: bytes, limits: FrameLimits = LIMITS) -> None:
    """Decode ``data`` and, if it is a frame, read its body: only FrameError may escape."""
    try:
        frame = decode_frame(data, limits)
        if frame.dtype.is_tensor:
            frame_tensor(frame)
        else:
            frame.json_body()
    except FrameError as err:
        assert err.code and str(err)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_frame_error(data: bytes):
    decode_everything(data)


@FUZZ
@given(st.binary(max_size=64))
def test_arbitrary_bytes_after_a_valid_magic_decode_or_raise_frame_error(rest: bytes):
    decode_everything(b"\xce\x9b\x01" + rest)


@FUZZ
@given(frames, st.data())
def test_mutated_valid_frames_decode_or_raise_frame_error(frame: Frame, data: st.DataObject):
    raw = bytearray(encode_frame(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if op == "flip" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[data.draw(st.integers(0, len(raw))) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=8))
    small = FrameLimits(max_frame_bytes=4096, max_ndim=3, max_json_bytes=256, max_dim=64)
    decode_everything(bytes(raw))
    decode_everything(bytes(raw), small)


# --- limits ------------------------------------------------------------------------------------


def test_limits_defaults():
    limits = FrameLimits()
    assert limits.max_frame_bytes == 64 * 1024 * 1024
    assert (limits.max_ndim, limits.max_json_bytes, limits.max_dim) == (4, 64 * 1024, 1 << 24)
    with pytest.raises(AttributeError):
        limits.max_ndim = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_frame_bytes", 19),
        ("max_frame_bytes", 1.5),
        ("max_ndim", 0),
        ("max_ndim", 5),
        ("max_ndim", True),
        ("max_json_bytes", 1),
        ("max_json_bytes", 128 * 1024 * 1024),
        ("max_dim", 0),
        ("max_dim", 2**32),
        ("max_dim", "big"),
    ],
)
def test_limits_reject_bad_values_naming_them(field: str, value: object):
    with pytest.raises(ConfigError) as err:
        FrameLimits(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_tighter_limits_are_enforced():
    limits = FrameLimits(max_ndim=2, max_dim=8)
    with pytest.raises(FrameError) as err:
        decode_frame(raw_frame(dims=(1, 1, 2), payload=bytes(4)), limits)
    assert err.value.code == "bad_shape"
    with pytest.raises(FrameError) as err:
        decode_frame(raw_frame(dims=(1, 9), payload=bytes(18)), limits)
    assert err.value.code == "too_large"
    assert decode_frame(raw_frame(dims=(1, 8), payload=bytes(16)), limits).shape == (1, 8)

"""Hostile frames for fuzzing a body server: valid-looking headers with mutated fields, and plain garbage.

Shared by tests/server/test_fuzz.py (a few hundred inputs per run) and scripts/fuzz_server.py (long runs).
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from lambdasplit.wire import MessageType, WireDtype, decode_frame

# The error codes docs/protocol.md documents; any other answer (or none, or a crash) is a finding.
KNOWN_CODES = {
    "unauthorized", "hello_first", "bad_protocol", "model_mismatch", "too_many_sessions", "unknown_session",
    "bad_shape", "bad_dtype", "bad_position", "context_full", "memory_full", "unexpected_type", "wrong_mode",
    "bad_request", "text_message", "bad_magic", "bad_version", "unknown_type", "truncated", "size_mismatch",
    "unknown_group", "group_mismatch", "bad_tree",
    "too_large", "non_finite", "bad_flags", "bad_json", "bad_header",
}  # fmt: skip

u8, u16, u32 = st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF_FFFF)
small = st.integers(0, 70)


@st.composite
def mutated_frames(draw: st.DrawFn, session: int = 1) -> bytes:
    """A header that is right in most fields and wrong in some, with a payload of a drawn size."""
    mtype = draw(st.sampled_from([int(t) for t in MessageType]) | u8)
    dtype = draw(st.sampled_from([int(d) for d in WireDtype]) | u8)
    ndim = draw(st.integers(0, 4) | u8)
    flags = draw(st.sampled_from([0, 1]) | u16)
    sess = draw(st.sampled_from([0, session, session + 1]) | u32)
    position = draw(st.sampled_from([0, 1, 5]) | u32)
    dims = [draw(st.sampled_from([1, 2, 64]) | small | u32) for _ in range(min(ndim, 6))]
    version = draw(st.sampled_from([1]) | u8)
    magic = draw(st.sampled_from([b"\xce\x9b"]) | st.binary(min_size=2, max_size=2))
    header = struct.pack("<2sBBBBHII", magic, version, mtype, dtype, ndim, flags, sess, position)
    header += b"".join(struct.pack("<I", d) for d in dims)
    payload = draw(st.binary(max_size=600) | st.sampled_from([b"{}", b'{"a": 1}', b"\x00" * 256, b"\xff" * 256]))
    return header + payload


frames = mutated_frames() | st.binary(max_size=200)


def unanswered(data: bytes) -> bool:
    """Whether ``data`` is a well-formed TREE frame: the FORWARD after it answers for it, so it has no reply of its
    own (docs/protocol.md, "Token trees")."""
    try:
        return decode_frame(data).type is MessageType.TREE
    except Exception:
        return False

"""Size caps the frame decoder enforces before it trusts anything a peer declared.

A frame arrives from an untrusted peer. Every size in its header is checked against these caps
*before* anything is allocated from it, so a 24-byte frame declaring a (2**24, 2**24) tensor costs
the receiver nothing but an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdasplit.errors import ConfigError

# The format itself (protocol version 1) has room for at most 4 dims: (batch, channels, height,
# width) of a diffusion latent is the largest tensor Λ-Split sends. Limits may only tighten this.
FORMAT_MAX_NDIM = 4
# Every dim is a u32 on the wire.
U32_MAX = 0xFFFF_FFFF


@dataclass(frozen=True)
class FrameLimits:
    """Caps for decoding one frame; the defaults suit every model Λ-Split ships with.

    Attributes:
        max_frame_bytes: largest whole frame (header + payload). 64 MiB holds a float16
            (8192, 2048) prompt hidden state with room to spare; larger prompts go in chunks.
        max_ndim: most dims a tensor may have, 1..4 (4 is the format's own maximum).
        max_json_bytes: largest JSON control payload. Control messages are small; a cap well
            below the frame cap keeps a hostile peer from making the JSON parser do real work.
        max_dim: largest single dim. 1 << 24 is far above any sequence length or hidden size and
            keeps products of dims far from overflowing anything downstream.
    """

    max_frame_bytes: int = 64 * 1024 * 1024
    max_ndim: int = FORMAT_MAX_NDIM
    max_json_bytes: int = 64 * 1024
    max_dim: int = 1 << 24

    def __post_init__(self) -> None:
        # bool is an int subclass; FrameLimits(max_ndim=True) is certainly a mistake.
        for name in ("max_frame_bytes", "max_ndim", "max_json_bytes", "max_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"FrameLimits.{name} must be an int, got {value!r}")
        # 16 fixed header bytes + one dim: the smallest frame that can carry any payload.
        if self.max_frame_bytes < 20:
            raise ConfigError(
                f"FrameLimits.max_frame_bytes must be at least 20 (a header with one dim), got {self.max_frame_bytes}"
            )
        if not 1 <= self.max_ndim <= FORMAT_MAX_NDIM:
            raise ConfigError(
                f"FrameLimits.max_ndim must be in 1..{FORMAT_MAX_NDIM} (JSON frames need 1 dim), got {self.max_ndim}"
            )
        # "{}" is the smallest JSON object.
        if not 2 <= self.max_json_bytes <= self.max_frame_bytes:
            raise ConfigError(
                f"FrameLimits.max_json_bytes must be in 2..max_frame_bytes ({self.max_frame_bytes}), "
                f"got {self.max_json_bytes}"
            )
        if not 1 <= self.max_dim <= U32_MAX:
            raise ConfigError(f"FrameLimits.max_dim must be in 1..{U32_MAX} (a u32), got {self.max_dim}")

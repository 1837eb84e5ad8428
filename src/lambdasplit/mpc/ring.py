"""Fixed-point numbers in the ring of integers modulo 2^64, held in int64 tensors.

A real ``x`` is encoded as ``round(x * 2^f)`` (``f = frac_bits``, default 16: resolution 1.5e-5). Additions and
products of int64 tensors wrap around modulo 2^64 in torch, which is exactly the ring arithmetic additive
sharing needs; decoding reads the int64 as a signed number, so encodable values are ``|x| < 2^(63 - f)``
(2^47 = 1.4e14 at f = 16).

Why 16 bits (measured on SmolLM2-135M at 2:28, docs/secret-sharing.md): the body's values span 1e-3 (rsqrt
of the mean square at the attention-sink position) to 2.5e4 (the residual stream there). A product of two
encoded values carries 2f fractional bits before truncation, and 2-party truncation fails with probability
about ``|x * y| * 2^(2f) / 2^64`` (``beaver.truncate``); f = 16 keeps that below 2^-24 for products up to 2^8
while giving the 1e-4 relative precision the softmax and norms need. f is configurable for other models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from lambdasplit.errors import ConfigError

RING_BITS = 64
KEY_BYTES = 16  # a stream key: AES-128
_LOW, _HIGH = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Ring:
    """Fixed-point encoding with ``frac_bits`` fractional bits in int64 (the ring Z / 2^64)."""

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise ConfigError(f"frac_bits must be in [0, 30] (products carry 2 * frac_bits), got {self.frac_bits}")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    def encode(self, x: torch.Tensor | float) -> torch.Tensor:
        """Real values (any float shape) -> int64 of the same shape, rounded to the nearest 2^-f."""
        x = torch.as_tensor(x, dtype=torch.float64)
        limit = 2.0 ** (63 - self.frac_bits)
        if x.numel() and not x.is_meta and x.abs().max().item() >= limit:
            raise ConfigError(f"|x| must be below 2^{63 - self.frac_bits} to encode at frac_bits={self.frac_bits}")
        return torch.round(x * self.scale).to(torch.int64)

    def decode(self, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """int64 ring elements (read as signed) -> real values of ``dtype``, same shape."""
        return (v.to(torch.float64) / self.scale).to(dtype)


def random_elements(shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform ring elements of ``shape`` (int64) from ``generator``.

    torch.randint's upper bound is exclusive and must fit int64, so 2^63 - 1 is never drawn: a bias of 2^-64,
    far below anything measurable.
    """
    return torch.randint(_LOW, _HIGH, tuple(shape), dtype=torch.int64, generator=generator)


class Prg:
    """AES-128-CTR keystream as uniform ring elements (int64). Two ``Prg`` of one key give the same stream.

    What a party may see is drawn from this, never from torch's generators (Mersenne Twister: its state, and
    so its past and future output, is recoverable from 624 of its words). About 2 GB/s on one core.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a stream key has {KEY_BYTES} bytes, got {len(key)}")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def elements(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        if n == 0:
            return torch.zeros(tuple(shape), dtype=torch.int64)
        words = bytearray(self._stream.update(bytes(8 * n)))
        return torch.frombuffer(words, dtype=torch.int64).view(tuple(shape))

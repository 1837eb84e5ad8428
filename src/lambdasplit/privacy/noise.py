"""Gaussian noise on the uplink: a device-side ``WireTransform`` that blurs what is sent.

Scale convention: each sent state ``h`` (one position, D values) gets independent noise of standard
deviation ``sigma * rms(h)`` per channel, where ``rms(h) = sqrt(mean(h ** 2))`` over that state's D channels.
So ``sigma`` is the noise-to-signal ratio in RMS terms: ``rms(noise) / rms(h) ~= sigma`` (0.5: noise half
the size of the state). Relative to each state because state norms differ by orders of magnitude between
positions (the first position carries outlier activations), so one absolute sigma would be meaningless.

Only the uplink is noised. ``decode`` is the identity: the downlink is produced by the cloud, and noise
the device adds after receiving it hides nothing from the cloud or an eavesdropper; it would only cost
accuracy. The body runs on the noisy states as sent, so every later position of the conversation sees
the noise through the body's KV cache.

Noise is fresh on every call, drawn from a generator seeded once (``seed``), so a run is reproducible.
"""

from __future__ import annotations

import torch

from lambdasplit.errors import ConfigError


class GaussianNoise:
    """``encode``: (B, T, D) -> the same plus N(0, (sigma * rms(h))^2) per channel; ``decode``: identity."""

    def __init__(self, sigma: float, seed: int = 0) -> None:
        if not sigma >= 0:
            raise ConfigError(f"sigma must be >= 0 (a fraction of each state's RMS), got {sigma}")
        self.sigma, self.seed = float(sigma), seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return hidden
        rms = hidden.float().pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, 1)
        noise = torch.randn(hidden.shape, generator=self._generator(hidden.device), device=hidden.device)
        return (hidden.float() + self.sigma * rms * noise).to(hidden.dtype)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma}, seed={self.seed})"

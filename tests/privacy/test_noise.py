"""Gaussian uplink noise: zero noise is the plain split; otherwise the sent states move by sigma in RMS terms."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.errors import ConfigError
from lambdasplit.generation import generate
from lambdasplit.privacy import intercept
from lambdasplit.privacy.noise import GaussianNoise
from lambdasplit.split import load_split

PROMPT = [1, 17, 40, 92, 5, 33, 250, 7, 61, 12, 99, 140]


@pytest.fixture(scope="module")
def split(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    return load_split(path, "2:4", device="cpu", dtype="float32")


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt()


def test_sigma_zero_is_the_plain_split(split) -> None:
    plain = intercept(split, PROMPT, max_new_tokens=8)
    split.wire_transform = GaussianNoise(0.0)
    try:
        noisy = intercept(split, PROMPT, max_new_tokens=8)
    finally:
        split.wire_transform = None
    assert noisy.output_ids == plain.output_ids
    assert torch.equal(noisy.uplink, plain.uplink) and torch.equal(noisy.downlink, plain.downlink)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_noise_is_sigma_times_each_states_rms(sigma: float) -> None:
    # States whose sizes differ by 1000x: the noise follows each one's own RMS.
    hidden = torch.randn(2, 50, 512) * torch.logspace(-1, 2, 50)[None, :, None]
    sent = GaussianNoise(sigma, seed=1).encode(hidden)
    ratio = rms(sent - hidden) / rms(hidden)  # (2, 50)
    assert torch.allclose(ratio, torch.full_like(ratio, sigma), rtol=0.15)
    assert ratio.mean().item() == pytest.approx(sigma, rel=0.02)
    assert GaussianNoise(sigma).decode(hidden) is hidden  # the downlink is left alone


def test_noise_is_seeded_and_fresh_on_every_call() -> None:
    hidden = torch.randn(1, 4, 64)
    a, b = GaussianNoise(0.5, seed=3), GaussianNoise(0.5, seed=3)
    first = a.encode(hidden)
    assert torch.equal(first, b.encode(hidden))
    assert not torch.equal(first, a.encode(hidden))
    assert not torch.equal(first, GaussianNoise(0.5, seed=4).encode(hidden))
    with pytest.raises(ConfigError, match="sigma must be >= 0"):
        GaussianNoise(-0.1)


def test_the_split_sends_noisy_states_and_runs_on_them(split) -> None:
    plain = intercept(split, PROMPT, max_new_tokens=1)
    split.wire_transform = GaussianNoise(0.5, seed=0)
    try:
        noisy = intercept(split, PROMPT, max_new_tokens=1)
        assert generate(split, PROMPT, max_new_tokens=4).token_ids  # generation still runs end to end
    finally:
        split.wire_transform = None
    p = len(PROMPT)
    ratio = rms(noisy.uplink[:p] - plain.uplink[:p]) / rms(plain.uplink[:p])
    assert ratio.mean().item() == pytest.approx(0.5, rel=0.2)
    assert not torch.allclose(noisy.downlink, plain.downlink)  # the body ran on what was sent

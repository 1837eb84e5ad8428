"""A5, the noise sweep: one row per sigma, utility and attack figures side by side."""

from __future__ import annotations

import pytest

from lambdasplit.audit.attacks.inverter import train_inverter
from lambdasplit.audit.attacks.noise_sweep import attacker_noise, noise_sweep
from lambdasplit.audit.corpus import token_stream
from lambdasplit.split import load_split

PROMPTS = [[1, 17, 40, 92, 5, 33, 250, 7, 61, 12], [1, 99, 140, 8, 3, 77, 21, 5, 5, 19, 200]]


def test_sweep_on_a_tiny_model(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, "1:4", device="cpu", dtype="float32")
    trained: list[float] = []

    def make_inverter(sigma: float):
        trained.append(sigma)
        noise = attacker_noise(sigma)
        return train_inverter(split, tokens=1024, epochs=1, window=32, width=32, negatives=None, transform=noise)

    calls: list[tuple[int, int]] = []
    text = token_stream(split.tokenizer, 256, split="heldout")
    points = noise_sweep(
        split,
        PROMPTS,
        [0.0, 2.0],
        make_inverter=make_inverter,
        text_ids=text,
        window=64,
        chat=False,
        max_new_tokens=6,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert split.wire_transform is None  # restored
    assert trained == [0.0, 2.0] and calls == [(1, 2), (2, 2)]
    plain, noisy = points
    assert plain.sigma == 0.0 and plain.perplexity_ratio == 1.0 and plain.greedy_agreement == 1.0
    # A random 5-layer model: nearest neighbour still reads its first layer's states far above chance (1/320).
    assert plain.nearest_neighbour_accuracy > 0.1
    assert noisy.perplexity_ratio != pytest.approx(1.0, rel=1e-3)
    assert noisy.nearest_neighbour_accuracy < plain.nearest_neighbour_accuracy
    for p in points:
        assert 0 <= p.greedy_agreement <= 1 and p.inverter_accuracy is not None and 0 <= p.inverter_accuracy <= 1
        assert set(p.to_dict()) >= {"sigma", "perplexity_ratio", "greedy_agreement", "inverter_accuracy"}


def test_sweep_without_an_inverter(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, "1:4", device="cpu", dtype="float32")
    text = token_stream(split.tokenizer, 128, split="heldout")
    (point,) = noise_sweep(split, PROMPTS[:1], [0.5], text_ids=text, window=64, chat=False, max_new_tokens=2)
    assert point.inverter_accuracy is None and point.sigma == 0.5

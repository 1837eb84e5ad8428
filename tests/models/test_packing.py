"""``models.packing``: linear layers on oneDNN with pre-packed weights, for CPU inference."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from lambdasplit.config import Runtime
from lambdasplit.models import packing
from lambdasplit.models.packing import ENV, PackedLinear, onednn_available, pack_linears
from lambdasplit.models.unsplit import load_unsplit
from lambdasplit.split import load_split

pytestmark = pytest.mark.skipif(
    not onednn_available(), reason="this PyTorch has no oneDNN linear operators, or LAMBDASPLIT_ONEDNN=0"
)


def test_a_packed_layer_computes_what_linear_computes_and_follows_its_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 24)
    x = torch.randn(2, 5, 48)
    assert pack_linears(nn.Sequential(layer)) == 1 and type(layer) is PackedLinear
    with torch.inference_mode():
        layer(x[:1, :1])  # one row: MKL's path, nothing packed
        assert layer._packed is None
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
        first = layer._packed
        assert first is not None
        layer(x[:, :2])  # another row count: the same packed weights
        assert layer._packed is first
    with torch.no_grad():  # changed in place (an adapter merged, say): packed again, never stale
        layer.weight.mul_(2)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
        layer.bias.add_(1)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.randn(24, 48)  # the same parameter, new values (no version bump)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.weight = nn.Parameter(torch.randn(24, 48))  # a new tensor
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    out = layer(x)  # gradients on: nn.Linear's own path, which trains
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (24, 48)
    assert layer(torch.randn(0, 48)).shape == (0, 24)


def test_split_parts_are_packed_on_a_cpu_and_can_be_left_alone(tiny_checkpoint, monkeypatch) -> None:
    path, ref = tiny_checkpoint("llama")
    split = load_split(path, "1:3", device="cpu", dtype="float32")
    for part in (split.head, split.body, split.tail):
        linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is PackedLinear for m in linears)
    unsplit = load_unsplit(path, Runtime.resolve("cpu", "float32"))  # --unsplit, and ModelDrafter's draft model
    assert all(type(m) is PackedLinear for m in unsplit.modules() if isinstance(m, nn.Linear))
    monkeypatch.setenv(ENV, "0")
    plain = load_split(path, "1:3", device="cpu", dtype="float32")
    assert not any(isinstance(m, PackedLinear) for m in plain.body.modules())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])  # a prefill of 6 rows: oneDNN's path
    with torch.inference_mode():
        packed = split.tail(split.body(split.head(ids)))
        unpacked = plain.tail(plain.body(plain.head(ids)))
        reference = ref(ids).logits[:, -1:]  # transformers' own model, unpacked (the tail keeps the last row)
    torch.testing.assert_close(packed, unpacked, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed, reference, atol=1e-4, rtol=1e-4)


def test_a_model_whose_packed_copy_would_not_fit_stays_on_linear(tiny_checkpoint, monkeypatch) -> None:
    """The packed copy doubles the linear weights' memory: where it would not fit (here: a machine of 256 KB, of
    which a quarter may hold copies; each part's linear weights take 120-330 KB in float32) the parts keep
    ``F.linear``, unless LAMBDASPLIT_ONEDNN=1 insists."""
    path, _ = tiny_checkpoint("llama")
    monkeypatch.setattr(packing, "memory_bytes", lambda: (256 << 10, 256 << 10))
    assert not packing.fits_in_memory(65 << 10) and packing.fits_in_memory(64 << 10)
    lean = load_split(path, "1:3", device="cpu", dtype="float32")
    assert not any(isinstance(m, PackedLinear) for part in (lean.head, lean.body, lean.tail) for m in part.modules())
    monkeypatch.setenv(ENV, "1")
    forced = load_split(path, "1:3", device="cpu", dtype="float32")
    assert any(isinstance(m, PackedLinear) for m in forced.body.modules())
    monkeypatch.setattr(packing, "memory_bytes", lambda: (None, None))  # unknown: packed, as before
    monkeypatch.delenv(ENV)
    unknown = load_split(path, "1:3", device="cpu", dtype="float32")
    assert any(isinstance(m, PackedLinear) for m in unknown.body.modules())


def test_copies_promised_to_earlier_parts_count_against_the_next(tiny_checkpoint, monkeypatch) -> None:
    """The copies are made at first use, so each part's check counts those promised before it: with room for the
    head's and the body's copies (120 + 240 KB) but not the tail's too (+ 327 KB), the tail stays on F.linear,
    though its copy alone would fit."""
    path, _ = tiny_checkpoint("llama")
    before = packing._promised  # parts other tests still hold
    room = before + (400 << 10)
    monkeypatch.setattr(packing, "memory_bytes", lambda: (4 * room, 4 * room))
    split = load_split(path, "1:3", device="cpu", dtype="float32")
    packed = [any(isinstance(m, PackedLinear) for m in part.modules()) for part in (split.head, split.body, split.tail)]
    assert packed == [True, True, False]
    del split, packed
    gc.collect()
    assert packing._promised <= before  # a part's promise ends with it

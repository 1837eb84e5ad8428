"""Int8 weights for drafting (``generation.drafthead.quantized``): products close to the float ones, sizes the kernel
cannot take left in float, and a look-ahead copy of the device's head that leaves the head itself untouched. (That
drafting with them keeps the output plain decoding's is checked with the trained head, in test_drafthead.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lambdasplit.config import Runtime
from lambdasplit.generation.drafthead.quantized import (
    Int8Linear,
    cpu_bfloat16,
    drafting_copy,
    int8_drafting,
    quantize_linears,
)
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("bias", [False, True])
def test_int8_products_are_close_to_the_float_ones(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    with torch.no_grad():
        if bias:
            linear.bias.normal_()
        x = torch.randn(2, 3, 64)
        expected = linear(x)
    quantized = Int8Linear.from_linear(linear)
    out = quantized(x)
    assert quantized.weight.dtype == torch.int8 and out.shape == expected.shape and out.dtype == torch.float32
    assert _relative(out, expected) < 0.01
    assert quantized(x.to(torch.bfloat16)).dtype == torch.bfloat16  # the output follows the input


def test_a_size_the_kernel_cannot_take_stays_float() -> None:
    """Inner sizes other than multiples of 16 fail in the kernel or, at 8 modulo 16, give wrong sums: refused."""
    with pytest.raises(ValueError, match="multiple of 16"):
        Int8Linear(torch.randn(32, 24))
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))
    assert quantize_linears(model) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[2], Int8Linear)


def test_the_drafting_copy_looks_ahead_as_the_head_does_and_leaves_it_alone(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    head = load_split(path, (2, NUM_LAYERS), parts=("head",), device="cpu", dtype="float32").head
    assert head is not None and head.model is not None
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    before = head(ids, head.new_cache())
    copy = drafting_copy(head)
    assert copy.model is not None and copy.model is not head.model
    quantized = [m for m in copy.model.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    assert not any(isinstance(m, Int8Linear) for m in head.model.modules())
    assert copy.model.get_input_embeddings() is head.model.get_input_embeddings()  # shared, not copied
    # Through the same cache as the head uses: what the copy writes there is what the head would, nearly.
    cache = head.new_cache()
    head(ids[:, :4], cache)
    rows = copy(ids[:, 4:], cache)
    assert cache.get_seq_length() == 6
    assert _relative(rows, before[:, 4:]) < 0.03
    assert torch.equal(head(ids, head.new_cache()), before)  # the head computes what it did


def test_int8_drafting_where_bfloat16_is_native() -> None:
    cpu = torch.device("cpu")
    assert int8_drafting(Runtime(cpu, torch.float32)) == cpu_bfloat16()
    assert not int8_drafting(Runtime(cpu, torch.bfloat16))

"""Int8 weights for drafting on a CPU: cheaper guesses, the same output.

A guess costs the device one row through its head's layers (the look-ahead, whose output the draft head reads) and
one through the draft head, and each is a product of one row with every weight matrix: the time goes into reading
the weights. Weight-only int8 (one scale per output row, activations in bfloat16) reads a quarter of float32's
bytes, through PyTorch's own kernel for it (``torch.ops.aten._weight_int8pack_mm``).
SmolLM2-135M's first 2 layers after a 300-token context, one row, one thread, on an AMD EPYC VM with avx512_bf16:
1.41 ms against 3.26 in float32, the rows within 0.8% (relative L2). Drafting only: a guess's worth is an estimate
anyway, and the rows sent for verification are the model's own (``SplitDecoder.look_ahead``: a look-ahead through a
copy like this one is not reused by the verification, which runs the head on every row it sends).

Used where the CPU computes bfloat16 natively (``int8_drafting``); elsewhere it was not measured, and the kernel's
bfloat16 activations would be converted in software, so drafting stays as it was there. The kernel takes inner sizes
that are multiples of 16 only (others fail or, at 8 modulo 16, return wrong sums in torch 2.13), so other layers stay
as they are, and each quantized layer is checked against its float product once when it is made.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from lambdasplit.config import Runtime
from lambdasplit.split.parts import Head

#: Inner sizes the kernel takes (see the module's doc).
_MULTIPLE = 16
#: A quantized layer whose product on a test row is further than this from the float one (relative L2) is refused.
_TOLERANCE = 0.02


def _kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def cpu_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's test: AVX-512 BF16 or AMX on x86)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def int8_drafting(runtime: Runtime) -> bool:
    """Whether drafting with int8 weights pays here: a float32 model on a CPU that computes bfloat16 natively."""
    return runtime.device.type == "cpu" and runtime.dtype == torch.float32 and _kernel() and cpu_bfloat16()


class Int8Linear(nn.Module):
    """``nn.Linear``'s product with int8 weights (one scale per output feature) and bfloat16 activations; the output
    in the input's dtype. Inference only: nothing in it trains."""

    weight: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) bfloat16
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.shape[1] % _MULTIPLE:
            raise ValueError(f"int8 products need a 2-D weight whose inner size is a multiple of {_MULTIPLE}")
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = int(w.shape[1]), int(w.shape[0])
        probe = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(w.device)
        expected = probe @ w.T + (0.0 if bias is None else bias.detach().float())
        error = float((self(probe).float() - expected).norm() / expected.norm())
        if not error <= _TOLERANCE:  # also NaN
            raise ValueError(f"the int8 product is {error:.3f} off the float one here")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def _int8(linear: nn.Linear) -> nn.Module:
    """``linear`` as an ``Int8Linear``, or itself where the kernel cannot take it (its sizes, or its device)."""
    try:
        return Int8Linear.from_linear(linear)
    except (ValueError, RuntimeError):
        return linear


def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``module`` (subclasses included) by an ``Int8Linear`` where the kernel takes
    it; returns how many were replaced."""
    done = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and isinstance(new := _int8(child), Int8Linear):
                setattr(parent, name, new)
                done += 1
    return done


def drafting_copy(head: Head) -> Head:
    """A copy of the device's head for looking ahead while drafting: its decoder layers copied with int8 weights (their
    norms copied as they are), the embedding and rotary embedding the head's own. The head is left as it was; the
    copy runs on the head's KV cache (what it writes there is for drafting only)."""
    model = head.model
    if model is None:
        raise ValueError("a head without layers has nothing to quantize")
    layers = cast(nn.ModuleList, model.layers)
    # Deep-copy the layers with each linear layer replaced by its int8 version: no float copy of the weights is made.
    # (A layer the kernel cannot take is shared, not copied: it is the head's own, unchanged.)
    memo: dict[int, object] = {id(m): _int8(m) for m in layers.modules() if isinstance(m, nn.Linear)}
    quick = copy.copy(model)
    quick._modules = dict(model._modules)
    quick.layers = copy.deepcopy(layers, memo)
    return Head(quick, head.start, head.stop).eval()

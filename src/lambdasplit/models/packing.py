"""Linear layers on a CPU through oneDNN with pre-packed weights: the same product, a faster kernel for few rows.

A decode step multiplies a handful of rows (one token, or a speculative step's drafted rows) by every weight
matrix of the model. On a CPU in float32, ``F.linear`` goes to MKL's sgemm, whose path for 2-3 rows is slower than
for 4 (SmolLM2-135M, whole model after a 256-token context, one thread, this VM: 42 ms for 1 row, 67-74 for 2,
90 for 3, 68 for 4, 76 for 6, 91 for 12). oneDNN's inner product on weights reordered once into its own layout
took 37-40, 54, 51-56, 55-57, 59 and 67-72 ms for the same forwards, with logits within 6e-5 of MKL's (float32
rounding in another order); the LM head alone (49152 x 576) 4.7 ms a row against 7.1. So the verification of a
speculative step's rows costs far less, and a plain step a little less.

``pack_linears(module)`` turns each ``nn.Linear`` in ``module`` into a ``PackedLinear`` (the same object, its
class changed: parameters, ties and hooks are kept). Its forward is ``nn.Linear``'s except on a CPU, in float32,
with gradients off (inference: the only place it pays and the only one checked): there it runs oneDNN on a copy of
the weights in oneDNN's layout, made at the first such call and made again whenever the weight changes (a new
tensor, or an in-place change: its version counter), so an adapter merged into the weights or a transformed
checkpoint is never served stale. The copy costs the linear weights' size once more in memory (about 540 MB for
SmolLM2-135M in float32; the device's head and tail alone about 170 MB). ``LAMBDASPLIT_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

#: Set to "0" to keep every linear layer on ``F.linear``.
ENV = "LAMBDASPLIT_ONEDNN"


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN (mkldnn) for CPU tensors, and it is not turned off."""
    return os.environ.get(ENV, "1") != "0" and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Linear):
    """``nn.Linear`` that runs oneDNN on pre-packed weights for CPU float32 inference (see the module's doc)."""

    _packed: tuple[tuple[int, int, int], torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or x.numel() == 0
        ):
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version, -1 if self.bias is None else self.bias._version)
        if self._packed is None or self._packed[0] != key:
            packed_bias = None if self.bias is None else self.bias.detach().to_mkldnn()
            self._packed = (key, w.detach().to_mkldnn(), packed_bias)
        _, weight, bias = self._packed
        rows = x.reshape(-1, x.shape[-1]).to_mkldnn()
        out = torch._C._nn.mkldnn_linear(rows, weight, bias).to_dense()
        return out.reshape(*x.shape[:-1], out.shape[-1])


def pack_linears(module: nn.Module) -> int:
    """Make every ``nn.Linear`` in ``module`` a ``PackedLinear`` (subclasses of it are left alone: their forward
    is their own); returns how many. A no-op where oneDNN is not available or ``LAMBDASPLIT_ONEDNN=0``."""
    if not onednn_available():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = PackedLinear
            count += 1
    return count

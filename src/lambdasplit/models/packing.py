"""Linear layers on a CPU through oneDNN with pre-packed weights, for products of several rows.

A decode step multiplies one row (a token) by every weight matrix of the model; a speculative step multiplies
1 + its drafted rows, a prefill the prompt's. On a CPU in float32, ``F.linear`` goes to MKL's sgemm, whose path for
2-3 rows is slower than for 4. Here such products go to oneDNN's inner product (``mkldnn::_linear_pointwise``, the
kernel PyTorch's own compiler uses on a CPU) on a copy of the weights reordered once into oneDNN's blocked layout
(``mkldnn::_reorder_linear_weight``). SmolLM2-135M, the whole model after a 256-token context, one thread
(``benchmarks/linear_kernels.py``), MKL against this, on an AMD EPYC VM with AVX2 only: 103.8 / 94.0 ms for 2 rows,
127.2 / 96.8 for 3, 116.3 / 105.2 for 4, 132.4 / 118.4 for 8, 168.0 / 147.3 for 16, 391.5 / 342.7 for 64; the LM
head alone 22.3 / 10.3 ms for 2 rows; logits within 1e-4 (float32 rounding in another order). The first version of
this module called ``mkldnn_linear`` on weights and rows converted with ``to_mkldnn`` (a plain layout, and two
conversions a call): on an AVX-512 VM it was still far faster than MKL (61.0 / 44.8 ms for 2 rows, 798 / 465 for
256), but on the AVX2 one it lost to MKL (121.6 ms for 2 rows, 144.8 for 8) because each call paid 60-100 us over
MKL on the decoder's small matrices. For one row oneDNN gained little in process (37-40 ms against 42 on the
AVX-512 VM) and lost on a body server with two threads waiting passively (a plain step over loopback 60-66 ms
against 40-42: it wakes the second thread for every product), so products of fewer than ``MIN_ROWS`` rows stay on
MKL: plain decoding is unchanged; a speculative step's verification and a prefill cost less.

``pack_linears(module)`` turns each ``nn.Linear`` in ``module`` into a ``PackedLinear`` (the same object, its
class changed: parameters, ties and hooks are kept). Its forward is ``nn.Linear``'s except on a CPU, in float32,
with gradients off (inference: the only place it pays and the only one checked), for ``MIN_ROWS`` rows or more:
there it runs oneDNN on a copy of the weights in oneDNN's layout, made at the first such call and made again
whenever the weight changes (a new tensor, or an in-place change: its version counter), so an adapter merged into
the weights or a transformed checkpoint is never served stale. The copy costs the linear weights' size once more
in memory (about 540 MB for SmolLM2-135M in float32; the device's head and tail alone about 170 MB). So a module
is packed only where that copy fits: together with the copies this process has already promised (they are made
at first use), at most a quarter of the memory and half of what is available when it loads, the tighter of the
machine's and its cgroup's limits (``fits_in_memory``; a 7B model in float32, 26 GB of linear weights, stays on
``F.linear`` on a 64 GB server instead of running out of memory at its first prefill). ``LAMBDASPLIT_ONEDNN=0``
turns packing off, ``LAMBDASPLIT_ONEDNN=1`` packs whatever the memory.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Set to "0" to keep every linear layer on ``F.linear``, "1" to pack whatever the memory.
ENV = "LAMBDASPLIT_ONEDNN"
#: Products of fewer rows stay on ``F.linear`` (see the module's doc: one row is where MKL does well).
MIN_ROWS = 2

_log = logging.getLogger(__name__)
#: Bytes of packed copies promised by ``pack_linears`` to modules still alive in this process.
_promised = 0


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN (mkldnn) for CPU tensors with the two operators used here, and it is
    not turned off."""
    if os.environ.get(ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(getattr(torch.ops.mkldnn, op) is not None for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):  # a build without them: F.linear everywhere
        return False


class PackedLinear(nn.Linear):
    """``nn.Linear`` that runs oneDNN on pre-packed weights for CPU float32 inference (see the module's doc)."""

    #: (the weight packed, what identifies its values, the packed weight, the bias). The values are known by
    #: the weight's and bias's data pointers and version counters: an in-place change bumps the version, and
    #: ``weight.data = ...`` moves the pointer; holding the weight itself means a new tensor is never mistaken for
    #: an old one at a reused address.
    _packed: tuple[torch.Tensor, tuple[int, ...], torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or x.numel() < MIN_ROWS * x.shape[-1]
        ):
            return F.linear(x, w, self.bias)
        b = self.bias
        state = (w.data_ptr(), w._version) + ((-1, -1) if b is None else (b.data_ptr(), b._version))
        held = self._packed
        if held is None or held[0] is not w or held[1] != state:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            held = self._packed = (w, state, packed, None if b is None else b.detach())
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, held[2], held[3], "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])


def pack_linears(module: nn.Module) -> int:
    """Make every ``nn.Linear`` in ``module`` a ``PackedLinear`` (subclasses of it are left alone: their forward
    is their own); returns how many. A no-op where oneDNN is not available, ``LAMBDASPLIT_ONEDNN=0``, or the
    packed copies would not fit in memory (``fits_in_memory``; ``LAMBDASPLIT_ONEDNN=1`` packs anyway)."""
    if not onednn_available():
        return 0
    global _promised
    layers = [layer for layer in module.modules() if type(layer) is nn.Linear]
    # The copies float32 weights will get at first use (other dtypes stay on F.linear).
    copy = sum(layer.weight.numel() * 4 for layer in layers if layer.weight.dtype == torch.float32)
    if os.environ.get(ENV) != "1" and not fits_in_memory(_promised + copy):
        _log.info("linear layers left on F.linear: their packed copy (%.1f GB) would not fit in memory", copy / 1e9)
        return 0
    for layer in layers:
        layer.__class__ = PackedLinear
    _promised += copy
    weakref.finalize(module, _release, copy)
    return len(layers)


def _release(copy: int) -> None:
    global _promised
    _promised -= copy


def fits_in_memory(copy_bytes: int) -> bool:
    """Whether ``copy_bytes`` more fit: at most a quarter of the memory and half of what is available now
    (``memory_bytes``). True where neither can be read."""
    total, available = memory_bytes()
    if total is None:
        return True
    return copy_bytes <= min(total // 4, (available if available is not None else total) // 2)


def memory_bytes() -> tuple[int | None, int | None]:
    """(the memory this process may use, what is available now) in bytes, None where unknown: the machine's
    (Linux's MemTotal and MemAvailable; elsewhere the physical and free pages), or its cgroup's limit and what the
    cgroup has left, where that is tighter (a container)."""
    total, available = _machine_memory()
    limit, used = _cgroup_memory()
    if total is not None and limit is not None and limit < total:
        left = max(0, limit - (used or 0))
        return limit, left if available is None else min(available, left)
    return total, available


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage) of this process's memory cgroup (v2, else v1), None where there is none or no limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if not limit.isdigit():  # "max": no limit
            return None, None
        try:
            used: int | None = int(Path(usage_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            used = None
        return int(limit), used
    return None, None


def _machine_memory() -> tuple[int | None, int | None]:
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None, None

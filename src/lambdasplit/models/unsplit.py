"""The whole model in one process, as transformers loads it: the reference every split is compared against,
the ``--unsplit`` mode and the draft model of ``ModelDrafter``."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

from lambdasplit.config import Runtime
from lambdasplit.models.packing import pack_linears


def load_unsplit(path: str | Path, runtime: Runtime) -> PreTrainedModel:
    """The causal LM at ``path`` on ``runtime``'s device and dtype, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=runtime.dtype)
    # transformers wraps PreTrainedModel.to with functools.wraps; type checkers then see an unbound function
    # whose first parameter is self, so the device looks like the wrong argument. It is the usual Module.to.
    model.to(runtime.device)  # type: ignore[arg-type]
    if runtime.device.type == "cpu":
        pack_linears(model)  # the same kernels as a split's parts (models.packing)
    return model.eval()

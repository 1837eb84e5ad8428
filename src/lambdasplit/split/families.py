"""Which model families the generic split wraps exactly.

The generic recipe (``build.py``) is exact for a family when its base model's forward does nothing to
``inputs_embeds`` before the first layer: the body and tail are fed hidden states through that argument.
"""

from __future__ import annotations

import logging

from transformers import PretrainedConfig

from lambdasplit.errors import UnsupportedModelError

_log = logging.getLogger(__name__)

#: Families whose split equals the unsplit model in the test suite (tests/split/test_equivalence.py).
VERIFIED: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2"})

#: Families the generic recipe would get wrong, and why.
INCOMPATIBLE: dict[str, str] = {
    "granite": "its forward multiplies inputs_embeds by embedding_multiplier, so the body and tail would apply "
    "it a second time",
}


def check_family(config: PretrainedConfig) -> None:
    """Refuse known-incompatible families; warn (once per load) for families not verified by the tests."""
    family = getattr(config, "model_type", "?")
    if family in INCOMPATIBLE:
        raise UnsupportedModelError(f"model family {family!r} cannot be split exactly: {INCOMPATIBLE[family]}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{family!r} is an encoder-decoder model; lambdasplit splits decoder-only LMs")
    if family not in VERIFIED:
        _log.warning(
            "model family %r is not among those verified exact (%s); "
            "run `lambdasplit verify` to check the split against the unsplit model",
            family,
            ", ".join(sorted(VERIFIED)),
        )

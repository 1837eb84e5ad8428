"""Finding models and reading their weights: embedded defaults, local folders, GGUF files, hub ids."""

from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.registry import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel
from lambdasplit.models.resolve import lambdasplit_home, resolve_checkpoint

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "Checkpoint",
    "EmbeddedModel",
    "lambdasplit_home",
    "resolve_checkpoint",
]

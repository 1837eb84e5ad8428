"""The split engine: head, body and tail built from a model's own Hugging Face modules."""

from lambdasplit.split.build import build_part, layer_range, part_config
from lambdasplit.split.loader import DEFAULT_LAYERS, SplitModel, load_split
from lambdasplit.split.parts import Body, Head, Tail

__all__ = [
    "DEFAULT_LAYERS",
    "Body",
    "Head",
    "SplitModel",
    "Tail",
    "build_part",
    "layer_range",
    "load_split",
    "part_config",
]

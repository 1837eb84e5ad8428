"""Generation on split models: sessions with per-part KV caches, sampling, streaming text."""

from lambdasplit.generation.api import generate, prompt_ids, stream
from lambdasplit.generation.generate import Generation, GenerationResult, TokenEvent
from lambdasplit.generation.sampling import SamplingParams
from lambdasplit.generation.session import (
    BodyLink,
    Decoder,
    LocalBodyLink,
    ModelDecoder,
    SplitDecoder,
    Traffic,
)
from lambdasplit.generation.text import TextStream, encode_prompt

__all__ = [
    "BodyLink",
    "Decoder",
    "Generation",
    "GenerationResult",
    "LocalBodyLink",
    "ModelDecoder",
    "SamplingParams",
    "SplitDecoder",
    "TextStream",
    "TokenEvent",
    "Traffic",
    "encode_prompt",
    "generate",
    "prompt_ids",
    "stream",
]

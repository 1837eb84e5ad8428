"""Generation on split models: sessions with per-part KV caches, sampling, streaming text."""

from lambdasplit.generation.api import generate, prompt_ids, stream
from lambdasplit.generation.drafting import (
    DRAFTERS,
    Drafter,
    DraftLength,
    ModelDrafter,
    PromptLookupDrafter,
    StepCost,
    make_drafter,
    self_drafter,
)
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
    "DRAFTERS",
    "BodyLink",
    "Decoder",
    "DraftLength",
    "Drafter",
    "Generation",
    "GenerationResult",
    "LocalBodyLink",
    "ModelDecoder",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SamplingParams",
    "SplitDecoder",
    "StepCost",
    "TextStream",
    "TokenEvent",
    "Traffic",
    "encode_prompt",
    "generate",
    "make_drafter",
    "prompt_ids",
    "self_drafter",
    "stream",
]

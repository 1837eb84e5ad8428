"""A trained draft head (EAGLE family) for speculative steps on open-ended text: ``--speculative head``.

model.py    the head: fc + one Llama layer over the target's features; save/load with a fingerprint
data.py     training data: the target's own greedy answers and the hidden states its LM head saw; prompts
            from a file or written by the model itself
train.py    the recipe (feature regression + next-token loss, unrolled steps) and held-out scoring
drafter.py  ``HeadDrafter``: drafts from the features the device's tail already holds
"""

from pathlib import Path

from lambdasplit.generation.drafthead.data import (
    Answer,
    answer_prompts,
    chat_prompts,
    read_prompts,
    synthetic_prompts,
)
from lambdasplit.generation.drafthead.model import DraftHead, HeadInfo
from lambdasplit.generation.drafthead.train import Recipe, TrainingLog, evaluate, train_head, truth_ranks

#: The head shipped for the embedded default model (trained by ``benchmarks/train_draft_head.py``).
HEAD_FILE = Path(__file__).with_name("smollm2-135m-instruct.safetensors")

__all__ = [
    "HEAD_FILE",
    "Answer",
    "DraftHead",
    "HeadInfo",
    "Recipe",
    "TrainingLog",
    "answer_prompts",
    "chat_prompts",
    "evaluate",
    "read_prompts",
    "synthetic_prompts",
    "train_head",
    "truth_ranks",
]

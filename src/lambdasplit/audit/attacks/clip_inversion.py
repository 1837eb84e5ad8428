"""Prompt inversion from CLIP prompt embeddings: what every text-to-image policy sends up with the prompt.

The paper, unet-lambda and (conditioned) collafuse policies all send the text encoder's output, the
``prompt_embeds`` of diffusers' ``encode_prompt``. CLIP text encoders are causal: row t depends on tokens
0..t only. An attacker holding the public text encoder (the cloud, or an eavesdropper without TLS) therefore
reads the prompt left to right, like A1 (``exact_matching.py``) on an LLM: at each position it runs every
vocabulary token after the prefix recovered so far and keeps the one whose row t is nearest the intercepted
row. Rows after the end-of-text token are padding and are read the same way.

Cost: positions x vocabulary text-encoder rows, in batches (``shapes-t2i``: 16 x 156; SD's CLIP: 77 x 49,408).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lambdasplit.audit.attacks.result import AttackResult


def invert_prompt_embeds(
    text_encoder: Any,
    embeds: torch.Tensor,
    target: list[int],
    *,
    bos: int,
    batch: int = 1024,
) -> AttackResult:
    """Recover the token ids behind one prompt's ``embeds`` (L, D): position 0 is ``bos``, then each position's
    nearest candidate. ``target`` (the true ids, L of them) is for scoring only."""
    start = time.perf_counter()
    vocab = text_encoder.config.vocab_size
    device = next(text_encoder.parameters()).device
    embeds = embeds.to(device=device, dtype=torch.float32)
    recovered = [bos]
    distances: list[float] = []
    with torch.no_grad():
        for t in range(1, embeds.shape[0]):
            best, best_id = float("inf"), 0
            for lo in range(0, vocab, batch):
                ids = torch.arange(lo, min(vocab, lo + batch), device=device)
                prefix = torch.tensor(recovered, device=device).expand(len(ids), -1)
                rows = text_encoder(torch.cat([prefix, ids[:, None]], dim=1))[0][:, t].float()
                dist = (rows - embeds[t]).norm(dim=-1)
                i = int(dist.argmin())
                if float(dist[i]) < best:
                    best, best_id = float(dist[i]), int(ids[i])
            recovered.append(best_id)
            distances.append(best)
    return AttackResult(
        "clip-inversion",
        "prompt",
        recovered,
        list(target),
        time.perf_counter() - start,
        {"max_distance": max(distances, default=0.0), "positions": len(recovered)},
    )

"""Training a draft head on the target's own answers (``data.answer_prompts``), on a CPU in minutes to an hour.

The recipe (EAGLE's losses, with unrolled steps as in HASS / EAGLE-3's "training-time test"):

- input at answer position j: the token that followed it, ``x_{j+1}`` (with ``head_layers``, also what the target's
  first layers made of it, ``Answer.states``), and the target's feature ``f_j`` with a little uniform noise;
  targets: the next feature ``f_{j+1}`` (smooth L1) and the next token ``x_{j+2}`` (cross-entropy over the draft
  vocabulary; the answers are greedy, so this token is the target's argmax; or, with ``soft_labels``, against the
  target's whole distribution there, its LM head applied to ``f_{j+1}``, as EAGLE does);
- ``unroll`` more passes feed the head its own guesses in place of the features (the situation from the second
  drafted token on), with the same targets, so errors do not compound as fast; as when drafting, a guess attends to
  the true rows before its draft began and to the draft's own guesses only (``unrolled``);
- AdamW, cosine learning rate after a short warm-up, sequences batched with right padding.

``evaluate`` replays held-out answers as greedy drafting would: at each position, draft ``k`` tokens with the head
fed its own guesses and count how many match the target's answer: the accepted length of a step that starts
there. Averaged over every position it overstates a generation's tokens per step (a run of easy tokens counts at
each of its positions, where a generation takes it in one step); ``live_steps`` walks an answer as a generation
does, each step starting where the last one ended.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from lambdasplit.errors import ConfigError
from lambdasplit.generation.drafthead.data import Answer, coverage, draft_vocabulary
from lambdasplit.generation.drafthead.model import DraftHead, target_matrices
from lambdasplit.split.parts import rewind

T = TypeVar("T")


@dataclass
class Recipe:
    draft_vocab: int = 8192
    epochs: int = 8  # the shipped head's; the epoch kept is chosen on held-out answers when given
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    noise: float = 0.05  # uniform noise on input features, in units of the features' standard deviation
    token_weight: float = 0.5  # weight of the cross-entropy term against the feature regression
    soft_labels: bool = False  # cross-entropy against the target's distribution (from its next feature), not its token
    unroll: int = 1  # passes fed the head's own guesses after the first (0: none)
    head_layers: int = 2  # the head reads the output of the target's first N layers (0: the token embedding only)
    seed: int = 0


@dataclass
class TrainingLog:
    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0  # answer positions trained on, per epoch
    coverage: float = 0.0  # share of answer tokens in the draft vocabulary
    best_epoch: int = 0  # the epoch kept (by held-out accuracy; 0: the last, no held-out answers given)
    epochs: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pad(answers: Sequence[Answer], vocab_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch: inputs at positions 0..n-2 of each answer, targets at 1..n-1; right-padded (``mask``: real rows)."""
    width = max(len(a.tokens) - 1 for a in answers)
    d = answers[0].features.shape[1]
    feats = torch.zeros(len(answers), width + 1, d)
    tokens = torch.zeros(len(answers), width, dtype=torch.long)
    labels = torch.full((len(answers), width), -100, dtype=torch.long)
    positions = torch.zeros(len(answers), width, dtype=torch.long)
    mask = torch.zeros(len(answers), width, dtype=torch.long)
    states = torch.zeros(len(answers), width, d) if answers[0].states is not None else None
    for b, a in enumerate(answers):
        n = len(a.tokens) - 1
        feats[b, : n + 1] = a.features.float()
        if states is not None and a.states is not None:
            states[b, :n] = a.states[:n].float()
        tokens[b, :n] = a.tokens[:n]
        labels[b, :n] = vocab_index[a.tokens[1:]]
        positions[b, :n] = a.start + 1 + torch.arange(n)
        positions[b, n:] = a.start + 1 + n + torch.arange(width - n)
        mask[b, :n] = 1
    batch = {"feats": feats, "tokens": tokens, "labels": labels, "positions": positions, "mask": mask}
    return batch if states is None else batch | {"states": states}


def _unrolled_mask(length: int, depth: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask (1, 1, T, (depth + 1) * T) of the pass that is ``depth`` guesses deep, over the
    keys of every pass so far (the true features' pass first).

    Drafting from position r - depth, the head has the true pairs up to there in its cache, then its own guesses:
    so pass ``depth``'s row r sees pass 0's rows <= r - depth and, from each later pass m <= depth, its row
    r - depth + m only (EAGLE-3's training-time test; HASS's aligned context). Each row sees itself, so padded rows
    never see nothing, and real rows see only real ones (the padding is on the right)."""
    rows = torch.arange(length)[:, None]
    cols = torch.arange(length)[None, :]
    blocks = [cols <= rows - depth] + [cols == rows - depth + m for m in range(1, depth + 1)]
    allowed = torch.cat(blocks, dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def unrolled(
    head: DraftHead,
    tokens: torch.Tensor,
    features: torch.Tensor,
    position_ids: torch.Tensor,
    depth: int,
    states: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The head's guesses (B, T, D) from the true ``features`` (pass 0), then ``depth`` passes each fed the pass
    before's guesses: pass d's row r is what drafting from position r - d guesses at its d-th step, the true pairs
    up to r - d in the cache and the head's own after (``_unrolled_mask``). Rows r < d of pass d mean nothing."""
    cache = head.new_cache()  # every pass's keys, so that a guess attends to the true rows before its draft began
    passes: list[torch.Tensor] = []
    for d in range(depth + 1):
        if passes:
            features = torch.cat([features[:, :1], passes[-1][:, :-1]], dim=1)  # row r: the last pass's row r - 1
        mask = _unrolled_mask(tokens.shape[1], d, head.dtype).to(tokens.device)
        passes.append(head(tokens, features, position_ids, cache, attention_mask=mask, states=states))
    return passes


def _losses(
    head: DraftHead, batch: dict[str, torch.Tensor], recipe: Recipe, scale: float
) -> tuple[torch.Tensor, float]:
    feats, mask = batch["feats"], batch["mask"]
    inputs, targets = feats[:, :-1], feats[:, 1:]
    real = mask.bool()
    noisy = inputs + (torch.rand_like(inputs) * 2 - 1) * recipe.noise * scale
    labels = batch["labels"]
    if recipe.soft_labels:  # EAGLE's: the target's next-token distribution, over the draft vocabulary
        with torch.no_grad():
            taught = torch.softmax(head.logits(targets), dim=-1)
    total = torch.zeros(())
    correct = 0.0
    passes = unrolled(head, batch["tokens"], noisy, batch["positions"], int(recipe.unroll), batch.get("states"))
    for depth, guess in enumerate(passes):
        scored = real.clone()
        scored[:, :depth] = False  # no draft began before the answer
        logits = head.logits(guess[scored])
        if recipe.soft_labels:
            ce = F.cross_entropy(logits, taught[scored])
        else:
            ce = F.cross_entropy(logits, labels[scored], ignore_index=-100)
        total = total + F.smooth_l1_loss(guess[scored], targets[scored]) + recipe.token_weight * ce
        if depth == 0:
            correct = float((logits.argmax(-1) == labels[scored]).float().mean())
    return total, correct


def train_head(
    target: PreTrainedModel,
    answers: Sequence[Answer],
    recipe: Recipe | None = None,
    *,
    always: Sequence[int] = (),
    heldout: Sequence[Answer] = (),
    progress: Callable[[dict[str, float]], None] | None = None,
    init: DraftHead | None = None,
) -> tuple[DraftHead, TrainingLog]:
    """Train a draft head for ``target`` on ``answers``; ``progress`` gets a summary after each epoch.

    With ``heldout`` answers, each epoch ends by scoring them (next-token accuracy from the true features, the first
    drafted token's situation), and the head returned is the best epoch's: a few hundred answers are memorised long
    before the last epoch. With ``init``, training continues from that head (its weights and draft vocabulary; it
    must read as many layers' states as ``recipe.head_layers``), on new answers for instance."""
    recipe = recipe or Recipe()
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    embed, lm_head = (w.detach().float() for w in target_matrices(target))
    if recipe.head_layers and any(a.states is None for a in [*answers, *heldout]):
        raise ConfigError(
            f"a head reading the first {recipe.head_layers} layers trains on answers with states (data.add_states)"
        )
    if init is not None and init.head_layers != recipe.head_layers:
        raise ConfigError(
            f"the head to continue from reads {init.head_layers} layers' states, the recipe {recipe.head_layers}"
        )
    draft_ids = init.draft_ids if init is not None else draft_vocabulary(answers, recipe.draft_vocab, always)
    head = DraftHead(target.config, draft_ids, embed, lm_head, head_layers=recipe.head_layers).float().train()
    if init is not None:
        head.load_state_dict(init.state_dict())
    vocab_index = torch.full((lm_head.shape[0],), -100, dtype=torch.long)
    vocab_index[draft_ids] = torch.arange(len(draft_ids))
    usable = [a for a in answers if len(a.tokens) >= 2]
    scale = float(torch.cat([a.features for a in usable[:64]]).float().std())
    steps_per_epoch = math.ceil(len(usable) / recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    opt = torch.optim.AdamW(head.trainable(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / recipe.warmup_steps)
            * 0.5
            * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps)))
        ),
    )
    log = TrainingLog(tokens=sum(len(a.tokens) - 1 for a in usable), coverage=coverage(usable, draft_ids))
    start = time.perf_counter()
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, 0, {})
    for epoch in range(recipe.epochs):
        order = sorted(usable, key=lambda a: len(a.tokens) + rng.random() * 16)  # similar lengths together
        batches = [order[i : i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
        rng.shuffle(batches)
        loss_sum = acc_sum = 0.0
        for chunk in batches:
            loss, acc = _losses(head, _pad(chunk, vocab_index), recipe, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.trainable(), 1.0)
            opt.step()
            sched.step()
            log.steps += 1
            loss_sum, acc_sum = loss_sum + float(loss.detach()), acc_sum + acc
        summary = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / len(batches), 4),
            "top1": round(acc_sum / len(batches), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if heldout:
            summary["heldout_top1"] = round(_accuracy(head, heldout, vocab_index, recipe.batch_size), 4)
            if summary["heldout_top1"] > best[0]:
                best = (summary["heldout_top1"], epoch + 1, {n: t.clone() for n, t in head.state_dict().items()})
        log.epochs.append(summary)
        if progress is not None:
            progress(summary)
    if best[2]:
        head.load_state_dict(best[2])
        log.best_epoch = best[1]
    log.seconds = time.perf_counter() - start
    return head.eval(), log


@torch.no_grad()
def _accuracy(head: DraftHead, answers: Sequence[Answer], vocab_index: torch.Tensor, batch_size: int) -> float:
    """Next-token accuracy of the head from the true features (no noise, no unrolling) on ``answers``."""
    hits = total = 0.0
    head.eval()
    for i in range(0, len(answers), batch_size):
        batch = _pad([a for a in answers[i : i + batch_size] if len(a.tokens) >= 2], vocab_index)
        guess = head(
            batch["tokens"],
            batch["feats"][:, :-1],
            batch["positions"],
            attention_mask=batch["mask"],
            states=batch.get("states"),
        )
        real = batch["mask"].bool()
        hits += float((head.logits(guess[real]).argmax(-1) == batch["labels"][real]).sum())
        total += float(real.sum())
    head.train()
    return hits / max(1.0, total)


@torch.inference_mode()
def truth_ranks(head: DraftHead, answers: Sequence[Answer], depth: int = 8) -> list[list[int]]:
    """Greedy drafting replayed on held-out answers: at each answer position, the head drafts ``depth`` levels
    along the target's own continuation, and the rank of the true token among the head's guesses is kept at
    each level (-1: not in the draft vocabulary). Rank 0 at every level up to i means a chain draft of i tokens
    is accepted; rank < w_i at every level means a token tree with w_i branches at level i holds the accepted path.
    """
    ranks: list[list[int]] = []
    for a in answers:
        n = len(a.tokens)
        cache = head.new_cache()
        feats, toks = a.features.to(head.dtype), a.tokens
        states = a.states.to(head.dtype)[None] if a.states is not None else None

        def state(i: int, states: torch.Tensor | None = states) -> torch.Tensor | None:  # at answer token i
            return None if states is None else states[:, i : i + 1]

        index = torch.full((head.target_vocab,), -1, dtype=torch.long)
        index[head.draft_ids] = torch.arange(len(head.draft_ids))
        for j in range(n - 1):
            # The real pair at j enters the head's cache; then its guesses along the true continuation (rolled back).
            pos = torch.tensor([[a.start + 1 + j]])
            h = head(toks[j : j + 1][None], feats[j : j + 1][None], pos, cache, states=state(j))
            held = cache.get_seq_length()
            row = []
            for i in range(min(depth, n - 1 - j)):
                truth = int(toks[j + 1 + i])
                logits = head.logits(h[0, -1])
                at = int(index[truth])
                row.append(-1 if at < 0 else int((logits > logits[at]).sum()))
                h = head(toks[j + 1 + i : j + 2 + i][None], h[:, -1:], pos + 1 + i, cache, states=state(j + 1 + i))
            rewind(cache, held)
            ranks.append(row)
    return ranks


def live_steps(lengths: Sequence[int]) -> list[int]:
    """The drafted tokens accepted at each step of a greedy generation along one answer, from the count a draft
    starting at each of its positions would have accepted (``accepted_length``): each step starts where the last
    one ended, after its accepted tokens and the model's own."""
    steps, at = [], 0
    while at < len(lengths):
        steps.append(lengths[at])
        at += 1 + lengths[at]
    return steps


def by_answer(answers: Sequence[Answer], rows: Sequence[T]) -> list[Sequence[T]]:
    """``truth_ranks``'s rows (one per position, all answers in a row) split back into each answer's."""
    out, at = [], 0
    for a in answers:
        n = max(0, len(a.tokens) - 1)
        out.append(rows[at : at + n])
        at += n
    return out


def accepted_length(row: Sequence[int], widths: Sequence[int]) -> int:
    """Drafted tokens accepted from a tree with ``widths[i]`` branches at level i (all 1: a chain)."""
    for i, (rank, width) in enumerate(zip(row, widths, strict=False)):
        if not 0 <= rank < width:
            return i
    return min(len(row), len(widths))


def tree_size(widths: Sequence[int]) -> int:
    """Drafted tokens a tree of ``widths`` sends (each level multiplies the branches)."""
    size, nodes = 0, 1
    for w in widths:
        nodes *= w
        size += nodes
    return size


def evaluate(
    head: DraftHead, answers: Sequence[Answer], k: int = 6, widths: Sequence[int] | None = None
) -> dict[str, float]:
    """Mean tokens per verified step (accepted drafts + the model's own token) for a chain of ``k`` (or a tree of
    ``widths``) on held-out answers, a draft starting at every position (``tokens_per_step``) and steps walked as
    a generation takes them (``tokens_per_live_step``), and the acceptance of the first drafted token."""
    shape = list(widths) if widths is not None else [1] * k
    ranks = truth_ranks(head, answers, len(shape))
    lengths = [accepted_length(r, shape) for r in ranks]
    live = [n for one in by_answer(answers, lengths) for n in live_steps(one)]
    return {
        "tokens_per_step": 1 + sum(lengths) / max(1, len(lengths)),
        "tokens_per_live_step": 1 + sum(live) / max(1, len(live)),
        "first_token_acceptance": sum(1 for r in ranks if r and r[0] == 0) / max(1, len(ranks)),
        "drafted_per_step": tree_size(shape),
    }

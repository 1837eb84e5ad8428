"""A3, learned inversion: a small network, trained on public text, that reads tokens off intercepted states.

The attacker holds the public weights, so it makes its own training pairs: run the public head on public
text (``audit.corpus``: plain windows, and windows in the model's public chat template) with a quarter
of the tokens swapped for random ids (so every vocabulary entry is seen), and keep (state after layer X,
token) for every position. The inverter reads the states at t-1, t and t+1 (each divided by its RMS,
zeros past the edges; a causal model's state at t+1 also depends on token t) through a linear map plus an
MLP, and scores the result against the public embedding matrix E (V, D), frozen: ``logits = f(x) @ E.T``.
Tying the output to E lets it name tokens it never saw in training.

Measured on SmolLM2-135M (144k training tokens, 2 epochs: 2 to 3 CPU minutes on one thread): top-1 on
the user text of 8 held-out chat prompts (160 tokens) 100 / 99 / 94 / 93% at X = 1 / 2 / 4 / 8, on the
generated tokens fed back 99 / 97 / 96 / 92%; another seed moves these by a few points.

The inverter only learns the map the public head induces. If the device transforms what it sends with a
secret the attacker lacks (``SplitModel.wire_transform``), the inverter is applied all the same and
simply reads worse: that drop is the measurement. An attacker who knows the kind of transform (noise of
a given sigma) trains through the same transform with its own randomness (``transform=``).

Shapes: ``T`` positions, ``D`` hidden size, ``V`` vocabulary, ``H`` inverter width.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from os import PathLike
from typing import cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lambdasplit.audit.attacks.nearest_neighbour import positions
from lambdasplit.audit.attacks.result import AttackResult, Side
from lambdasplit.audit.corpus import chat_chunks, chunks
from lambdasplit.errors import ConfigError
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split.loader import SplitModel, WireTransform

Progress = Callable[[int, int], None]
_EPS = 1e-6

#: Changes whenever ``train_inverter``'s recipe (features, architecture, training) does, so an inverter saved
#: by an older recipe is not loaded as if it were this one (the audit's cache names carry it).
RECIPE = 1


def rms_normalise(states: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D) float32, each state divided by its RMS (so noise scaled to the RMS reads alike)."""
    s = states.float()
    return s / s.pow(2).mean(-1, keepdim=True).add(_EPS).sqrt()


def features(states: torch.Tensor) -> torch.Tensor:
    """(..., T, D) states in sequence order -> (..., T, 3D): normalised states at t-1, t, t+1, zeros past the edges."""
    s = rms_normalise(states)
    pad = torch.zeros_like(s[..., :1, :])
    return torch.cat([torch.cat([pad, s[..., :-1, :]], -2), s, torch.cat([s[..., 1:, :], pad], -2)], -1)


class Inverter(nn.Module):
    """Standardised features (3D,) -> a linear map plus an MLP (3D -> H -> D), scored against the frozen E (V, D).

    ``mean``/``std`` (3D,) standardise the features with training statistics: a few hidden dimensions carry
    outlier activations hundreds of times the others, which would drown the rest. ``meta`` records what
    it was trained for (model fingerprint, layer X, tokens, transform), so a cached inverter is not reused
    for another split.
    """

    # Buffers registered in __init__, declared so they type as tensors (nn.Module.__getattr__ gives Tensor | Module)
    embedding: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, embedding: torch.Tensor, width: int = 1024, meta: dict[str, str] | None = None) -> None:
        super().__init__()
        dim = embedding.shape[1]
        self.register_buffer("embedding", embedding.detach().float(), persistent=False)  # (V, D), never trained
        self.register_buffer("mean", torch.zeros(3 * dim))
        self.register_buffer("std", torch.ones(3 * dim))
        self.linear = nn.Linear(3 * dim, dim)  # started from least squares (see ``fit_linear``)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, width), nn.GELU(), nn.Linear(width, dim))
        with torch.no_grad():  # the MLP starts as zero: it learns what the linear map misses
            last = cast(nn.Linear, self.mlp[-1])  # Sequential indexing is typed nn.Module
            last.weight.zero_()
            last.bias.zero_()
        self.log_scale = nn.Parameter(torch.tensor(0.0))  # logit temperature
        self.meta = dict(meta or {})
        self.width = width

    def forward(self, feats: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3D) features -> (N, V) logits, or (N, C) logits over the token ids ``vocab`` (C,) when given."""
        table = self.embedding if vocab is None else self.embedding[vocab]
        x = (feats - self.mean) / self.std
        return (self.linear(x) + self.mlp(x)) @ table.T * self.log_scale.exp()

    @torch.no_grad()
    def fit_linear(self, feats: torch.Tensor, targets: torch.Tensor, ridge: float = 1.0) -> None:
        """Standardise with the statistics of ``feats`` (N, 3D); set the linear map to least squares onto E[targets]."""
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0) + 1e-3)
        x = (feats - self.mean) / self.std
        x1 = torch.cat([x, torch.ones(len(x), 1)], 1)  # (N, 3D + 1): the bias as a last column
        gram = x1.T @ x1 + ridge * torch.eye(x1.shape[1])
        w = torch.linalg.solve(gram, x1.T @ self.embedding[targets])  # (3D + 1, D)
        self.linear.weight.copy_(w[:-1].T)
        self.linear.bias.copy_(w[-1])

    @torch.inference_mode()
    def predict(self, states: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """(T, D) intercepted states in sequence order -> (T,) most likely token ids."""
        feats = features(states)
        return torch.cat([self(f).argmax(-1) for f in feats.split(batch)]) if len(feats) else feats.new_zeros(0).long()

    def save(self, path: str | PathLike[str]) -> None:
        """Trained weights and ``meta`` as safetensors (E is not stored: it comes from the public model)."""
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"meta": json.dumps(self.meta), "width": str(self.width)})

    @classmethod
    def load(cls, path: str | PathLike[str], public: SplitModel) -> Inverter:
        """Read an inverter saved by ``save``, taking E from ``public``; refuses one trained for other weights."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header.get("meta", "{}"))
        if meta.get("fingerprint") not in (None, public.fingerprint):
            raise ConfigError(f"{path} was trained on weights {meta['fingerprint']}, not {public.fingerprint}")
        inverter = cls(_embedding(public), width=int(header.get("width", 1024)), meta=meta)
        inverter.load_state_dict(load_file(str(path)))
        return inverter.eval()


def _embedding(public: SplitModel) -> torch.Tensor:
    if public.head is None or public.head.model is None:
        raise ConfigError("the inverter needs a split that holds the public head (its embedding matrix)")
    # get_input_embeddings() is typed nn.Module, so its weight reads as Tensor | Module
    weight = cast(torch.Tensor, public.head.model.get_input_embeddings().weight)
    return weight.detach().float().cpu()


@torch.inference_mode()
def public_states(
    public: SplitModel,
    windows: torch.Tensor,
    *,
    transform: WireTransform | None = None,
    batch: int = 16,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the public head on token windows (W, L) -> (W, L, D) states after layer X, through ``transform``."""
    assert public.head is not None
    out = []
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch].to(public.runtime.device)
        h = public.head(x)
        out.append((h if transform is None else transform.encode(h)).float().cpu())
        if progress is not None:
            progress(len(out))
    return torch.cat(out) if out else torch.empty(0, windows.shape[1], public.hidden_size)


def training_windows(
    public: SplitModel, tokens: int, *, window: int = 64, chat: float = 0.25, substitute: float = 0.25, seed: int = 0
) -> torch.Tensor:
    """The attacker's training tokens: (tokens // window, window) int64 windows of public training text.

    ``chat``: the fraction of windows that are public text in the model's public chat template
    (``corpus.chat_chunks``), the shape of every chat prompt on the wire. ``substitute``: the fraction of
    tokens replaced by uniformly random ids, so that every vocabulary entry is seen in context (the head
    runs on anything, not only on the corpus's words).
    """
    if public.tokenizer is None:
        raise ConfigError("the inverter trains on public text, so the public split needs its tokenizer")
    if tokens < window:
        raise ConfigError(f"need tokens >= window ({window}), got tokens={tokens}")
    count = tokens // window
    n_chat = round(chat * count) if public.tokenizer.chat_template else 0
    windows = torch.cat(
        [
            chunks(public.tokenizer, window, count - n_chat, seed=seed, split="train"),
            chat_chunks(public.tokenizer, window, n_chat, seed=seed, split="train"),
        ]
    )
    gen = torch.Generator().manual_seed(seed + 1)
    swap = torch.rand(windows.shape, generator=gen) < substitute
    windows[swap] = torch.randint(0, int(public.config.vocab_size), (int(swap.sum()),), generator=gen)
    return windows


def train_inverter(
    public: SplitModel,
    *,
    tokens: int = 144_000,
    epochs: float = 2.0,
    window: int = 64,
    width: int = 1024,
    batch: int = 512,
    negatives: int | None = 8192,
    lr: float = 2e-3,
    chat: float = 0.25,
    substitute: float = 0.25,
    transform: WireTransform | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> Inverter:
    """Train an inverter for the states after layer X of ``public`` on ``tokens`` tokens of public text.

    The public head runs on ``training_windows`` (``chat``, ``substitute``: see there); ``transform`` is
    applied to every state it outputs (an attacker who knows a noise defence's sigma trains with its own
    noise of that sigma). Then ``epochs`` passes of ``batch`` random positions per step (AdamW, cosine
    schedule), after a least-squares start. ``negatives``: each step's softmax runs over the step's own
    tokens plus this many random vocabulary ids (sampled softmax, about 5x cheaper than all V; ``None``:
    all V). ``progress(done, total)`` after each head batch and each step (total = head batches + steps).
    """
    if epochs <= 0:
        raise ConfigError(f"epochs must be > 0, got {epochs}")
    embedding = _embedding(public)
    windows = training_windows(public, tokens, window=window, chat=chat, substitute=substitute, seed=seed)
    head_batch = 16
    head_batches = math.ceil(len(windows) / head_batch)
    steps = max(1, round(epochs * windows.numel() / batch))
    total = head_batches + steps

    def head_progress(done: int) -> None:
        if progress is not None:
            progress(done, total)

    states = public_states(public, windows, transform=transform, batch=head_batch, progress=head_progress)
    feats_of, targets = _Positions(states), windows.reshape(-1)  # (W * L,) tokens
    del states
    meta = {
        "fingerprint": public.fingerprint,
        "model": public.name,
        "layer": str(public.points.head_layers),
        "tokens": str(windows.numel()),
        "steps": str(steps),
        "transform": repr(transform) if transform is not None else "",
    }
    with torch.random.fork_rng():  # seeded initialisation, without touching the caller's global RNG
        torch.manual_seed(seed)
        inverter = Inverter(embedding, width=width, meta=meta)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(targets), generator=gen)[:20_000]
    inverter.fit_linear(feats_of(sample), targets[sample])

    opt = torch.optim.AdamW(inverter.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        opt, lambda i: min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
    )
    order, cursor = torch.randperm(len(targets), generator=gen), 0
    inverter.train()
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(targets), generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        feats, y = feats_of(idx), targets[idx]
        if negatives is None:
            logits, labels = inverter(feats), y
        else:
            extra = torch.randint(0, len(embedding), (negatives,), generator=gen)
            vocab, labels = torch.unique(torch.cat([y, extra]), return_inverse=True)  # (C,) ids, labels into them
            logits, labels = inverter(feats, vocab), labels[: len(y)]
        loss = nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(head_batches + step + 1, total)
    return inverter.eval()


class _Positions:
    """Features of any positions of windowed states, without materialising all (W * L, 3D) of them."""

    def __init__(self, states: torch.Tensor) -> None:
        w, length, d = states.shape
        self.length = length
        self.flat = rms_normalise(states).reshape(w * length, d)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        pos = idx % self.length
        prev = self.flat[(idx - 1).clamp(min=0)] * (pos > 0).unsqueeze(-1)
        nxt = self.flat[(idx + 1).clamp(max=len(self.flat) - 1)] * (pos < self.length - 1).unsqueeze(-1)
        return torch.cat([prev, self.flat[idx], nxt], -1)


def invert(inverter: Inverter, intercept: Intercept, *, side: Side = "prompt") -> AttackResult:
    """Read ``side``'s tokens (the prompt's, or the generated ones fed back) off ``intercept.uplink``.

    One forward over every uplink row, so each position has its neighbours as context, then the rows of
    ``side`` are kept (see ``nearest_neighbour.positions``).
    """
    start = time.perf_counter()
    predicted = inverter.predict(intercept.uplink)
    rows, target = positions(intercept, side)
    return AttackResult(
        attack="inverter",
        side=side,
        recovered=predicted[rows].tolist(),
        target=target,
        seconds=time.perf_counter() - start,
        details={k: v for k, v in inverter.meta.items() if k != "fingerprint"},
    )

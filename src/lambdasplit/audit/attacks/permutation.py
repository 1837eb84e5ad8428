"""A4: recovering a secret permutation of the hidden dimension (the STIP-style key of ``privacy.keys``).

STIP ("STIP: Secure Three-Party Transformer Inference", arXiv 2023) hides the hidden dimension of the
states it sends behind a secret permutation ``h' = h[..., p] = h @ Q`` and transforms the cloud's weights
once to match. The attacks here are ours; each takes what one attacker holds and returns a ``KeyEstimate``:

- ``sorted_matching`` (eavesdropper): a permutation keeps every vector's multiset of values, so the sorted
  values of an intercepted state equal those of the public state it came from. A1's left-to-right search
  compares sorted values instead of states, reads the first rows of the traffic without the key, and the
  key follows from where each value went.
- ``statistical_matching`` (eavesdropper): per-dimension statistics of N intercepted states matched to the
  same statistics of public-model states on public text by an optimal assignment. Its accuracy against
  N is the measured cost of reusing one key for N vectors.
- ``weight_matching`` (curious cloud): the obfuscated body's input-side columns are ``W[:, p]`` up to
  orthogonal row transforms (the inner secrets), so column norms, row norms of the output side and the
  norm gains, over every body layer, give each hidden dimension a signature found again by assignment.

``key_from_tokens`` turns tokens recovered by any attack (A1 after ``decode_with``, invariant matching of
``rotation.py``) into a key: known plaintext. Rotation keys: ``rotation.py``.

Shapes: ``D`` hidden size, ``V`` vocabulary, ``N`` / ``T`` intercepted states.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn

from lambdasplit.audit.attacks.exact_matching import recover, sorted_values
from lambdasplit.audit.attacks.nearest_neighbour import public_head
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.privacy.keys import KeyKind, ObfuscationKey
from lambdasplit.privacy.obfuscate import OUTPUT_SIDE, hidden_norms, linears
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Body

#: A row of an estimated key counts as recovered when its cosine with the true row exceeds this.
ROW_COSINE = 0.99


@dataclass
class KeyEstimate:
    """An attacker's estimate of a key: ``matrix`` (D, D) float32, with ``h' ~= h @ matrix``.

    ``key_accuracy`` is set only when the true key was given for scoring (``score``): the fraction of
    hidden dimensions whose row of ``matrix`` has cosine > 0.99 with the true row, which for permutations
    is the fraction of dimensions mapped to the right place. ``details`` is JSON-serialisable.
    """

    kind: KeyKind
    matrix: torch.Tensor
    seconds: float
    key_accuracy: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def permutation(self) -> torch.Tensor | None:
        """(D,) ``p`` with ``h' = h[..., p]`` for a permutation estimate, else None."""
        return self.matrix.argmax(dim=0) if self.kind == "permutation" else None


def truth_matrix(truth: ObfuscationKey | torch.Tensor) -> torch.Tensor:
    """The true key's (D, D) matrix, float64 (scoring only)."""
    return (truth.matrix if isinstance(truth, ObfuscationKey) else truth).double().cpu()


def score(estimate: KeyEstimate, truth: ObfuscationKey | torch.Tensor) -> KeyEstimate:
    """Set ``estimate.key_accuracy`` against the true key (scoring only) and add ``details["frobenius"]``:
    ||Q_est - Q||_F / sqrt(D), 0 for an exact estimate, about 1.4 for an unrelated rotation."""
    q = truth_matrix(truth)
    est = estimate.matrix.double().cpu()
    cosine = nn.functional.cosine_similarity(est, q, dim=1)  # (D,) per model dimension
    estimate.key_accuracy = float((cosine > ROW_COSINE).double().mean())
    estimate.details["frobenius"] = float(torch.linalg.norm(est - q) / q.shape[0] ** 0.5)
    return estimate


def _finish(estimate: KeyEstimate, truth: ObfuscationKey | torch.Tensor | None) -> KeyEstimate:
    return estimate if truth is None else score(estimate, truth)


def decode_with(estimate: KeyEstimate, item: Intercept) -> Intercept:
    """``item`` with the estimated key undone on uplink and downlink (``h = h' Q^T``), for A1/A2/tail replay.

    A permutation estimate is undone by indexing, so a right key gives back the plain states bit for bit.
    """
    p = estimate.permutation
    if p is not None:
        inverse = torch.argsort(p)
        return replace(item, uplink=item.uplink[..., inverse], downlink=item.downlink[..., inverse])
    q = estimate.matrix.float()
    return replace(item, uplink=item.uplink @ q.T, downlink=item.downlink @ q.T)


# --- assignment ---------------------------------------------------------------------------------------------


def assign(cost: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` (D,) minimising ``sum_j cost[p[j], j]`` for a (D, D) cost[model dim, wire dim].

    Optimal (Hungarian, ``scipy.optimize.linear_sum_assignment``) when scipy is installed, else greedy:
    cheapest remaining pair first.
    """
    d = cost.shape[0]
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # greedy: exact whenever each dimension's best match is unambiguous
        p = torch.full((d,), -1, dtype=torch.long)
        used = torch.zeros(d, dtype=torch.bool)
        for flat in cost.flatten().argsort().tolist():
            i, j = divmod(flat, d)
            if p[j] < 0 and not used[i]:
                p[j], used[i] = i, True
        return p
    rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
    p = torch.empty(d, dtype=torch.long)
    p[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return p


def permutation_matrix(p: torch.Tensor) -> torch.Tensor:
    """(D, D) ``Q`` with ``h @ Q == h[..., p]``."""
    return torch.eye(len(p))[:, p]


def feature_cost(plain: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """(D, D) distances between per-dimension features ``plain`` (D, F) and ``sent`` (D, F).

    Each feature is centred and scaled by its spread over ``plain``'s dimensions so all count alike; one
    with no spread (all norm gains 1) tells nothing and is dropped. Exact arithmetic, not cdist's matrix
    product form, whose cancellation would swamp small differences.
    """
    mean, spread = plain.mean(dim=0), plain.std(dim=0)
    keep = spread > 1e-9 * spread.max().clamp_min(1e-300)
    a, b = (plain[:, keep] - mean[keep]) / spread[keep], (sent[:, keep] - mean[keep]) / spread[keep]
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def fit_key(plain: torch.Tensor, sent: torch.Tensor, kind: KeyKind) -> torch.Tensor:
    """The key (D, D) that best maps known states ``plain`` (N, D) onto their intercepted ``sent`` (N, D).

    Permutation: each wire dimension j takes the model dimension whose N values are closest to column j
    (one assignment); exact for one vector whose values are distinct. Rotation: orthogonal Procrustes,
    ``Q = U V^T`` for ``plain^T sent = U S V^T``, exact on the span of ``plain`` (all of it once N >= D
    independent states are known).
    """
    a, b = plain.double().cpu(), sent.double().cpu()
    if kind == "permutation":
        return permutation_matrix(assign(torch.cdist(a.T, b.T, compute_mode="donot_use_mm_for_euclid_dist")))
    u, _, vh = torch.linalg.svd(a.T @ b)
    return (u @ vh).float()


# --- eavesdropper: sorted values ---------------------------------------------------------------------------


@torch.inference_mode()
def sorted_matching(
    public: SplitModel,
    intercepts: Sequence[Intercept],
    *,
    rows: int = 32,
    wire_dtype: torch.dtype = torch.float32,
    max_candidates: int = 4096,
    truth: ObfuscationKey | torch.Tensor | None = None,
) -> KeyEstimate:
    """Read the first ``rows`` uplink rows without the key by their sorted values, and fit the key to them.

    A1's left-to-right search (``exact_matching.recover``) with the ``sorted_values`` view: a candidate
    token's public state, sorted, must equal the intercepted row, sorted, within the wire's rounding
    (``wire_dtype``). At X = 0 every row is a lone-token state; at X >= 1 the recovered prefix supplies the
    context, and candidates are ranked by the public model's next-token logits as well (sorted values rank
    poorly on their own). The rows found exactly give (public state, intercepted row) pairs and the key
    follows by assignment (``fit_key``); tied values (float16 rounding, a quantized embedding) are told
    apart by using several rows. Each intercept is read from its position 0 up to its first row with no
    match within ``max_candidates`` (SmolLM2's chat template: 12 rows, enough for the whole key over
    float16), then the next one, until ``rows`` rows are read.
    ``details``: ``tokens`` (recovered per row read), ``exact_rows``, ``rows``.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    start = time.perf_counter()
    head = public_head(public)
    plain, sent, tokens = [], [], []
    left = rows
    for item in intercepts:
        if left <= 0:
            break
        uplink = item.uplink[:left].float()
        found = recover(
            public,
            uplink,
            wire_dtype=wire_dtype,
            max_candidates=max_candidates,
            view=sorted_values,
            language_model=public.body is not None and public.tail is not None,
            stop_at_miss=True,
        )
        left -= len(found.ids)
        tokens += found.ids
        hits = torch.tensor(found.hits)
        states = head(torch.tensor([found.ids], device=public.runtime.device))[0].float().cpu()
        plain.append(states[hits])
        sent.append(uplink[: len(hits)][hits])
    a, b = torch.cat(plain), torch.cat(sent)
    if len(a) == 0:
        raise ValueError(
            f"no uplink row matched a candidate's sorted values within the {wire_dtype} wire dtype's rounding: "
            "is the key a permutation, and is that the wire dtype?"
        )
    estimate = KeyEstimate(
        "permutation",
        fit_key(a, b, "permutation"),
        time.perf_counter() - start,
        details={"rows": len(tokens), "exact_rows": len(a), "tokens": tokens},
    )
    return _finish(estimate, truth)


# --- eavesdropper: statistics of the traffic --------------------------------------------------------------

_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


@torch.inference_mode()
def reference_states(
    public: SplitModel, *, tokens: int = 16_384, chat: bool | None = None, seed: int = 0
) -> torch.Tensor:
    """(M, D) distinct public head outputs on about ``tokens`` tokens of public text (``audit.corpus``).

    ``chat`` (default: when the tokenizer has a chat template) wraps the text the way chat traffic looks:
    one sentence as the user's message, the next three as the answer, through the chat template (with
    its default system prompt), at most 160 tokens each. Otherwise windows of 64 tokens of plain text.
    The statistics of chat traffic differ enough from plain text that matching chat traffic against
    plain-text statistics fails (SmolLM2, X = 1: 16% of the key from 1,259 vectors, against 100%).
    """
    import re

    from lambdasplit.audit.corpus import chunks, documents
    from lambdasplit.generation.text import encode_prompt

    tokenizer = public.tokenizer
    if tokenizer is None:
        raise ValueError("reference states are made from public text: the public split needs its tokenizer")
    head, device = public_head(public), public.runtime.device
    if chat is None:
        chat = bool(tokenizer.chat_template)
    out: list[torch.Tensor] = []
    if not chat:
        windows = chunks(tokenizer, 64, max(1, tokens // 64), seed=seed, split="train")
        out = [head(w.to(device)).float().cpu().reshape(-1, public.hidden_size) for w in windows.split(16)]
    else:
        sentences = [
            s for doc in documents("train") for s in re.split(r"(?<=[.?!])\s+", doc) if 20 < len(s.strip()) < 300
        ]
        order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
        conversations: list[list[int]] = []
        for at in range(0, len(order) - 3, 4):
            if sum(map(len, conversations)) >= tokens:
                break
            answer = " ".join(sentences[i].strip() for i in order[at + 1 : at + 4])
            user = sentences[order[at]].strip()
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            conversations.append(encode_prompt(tokenizer, messages, chat=True)[:160])
        for at in range(0, len(conversations), 16):  # right-padded: a causal head's real positions ignore pads
            batch = conversations[at : at + 16]
            ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
            for row, conversation in enumerate(batch):
                ids[row, : len(conversation)] = torch.tensor(conversation)
            states = head(ids.to(device)).float().cpu()
            out += [states[row, : len(conversation)] for row, conversation in enumerate(batch)]
    return distinct_rows(torch.cat(out))


def distinct_rows(states: torch.Tensor) -> torch.Tensor:
    """``states`` (N, D) without repeated rows, first occurrences in order.

    Every conversation starts with the same chat-template tokens, so their states repeat exactly across
    sessions; an eavesdropper sees that and counts each once.
    """
    _, inverse = torch.unique(states, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(states), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(states)), "amin")
    return states[first.sort().values]


def _unit_rms(states: torch.Tensor) -> torch.Tensor:
    """``states`` (N, D) float64, each divided by its RMS.

    The first position of a sequence carries activations hundreds of times larger than the rest, and
    how often it occurs depends on how the traffic was cut: per-state scaling keeps it from dominating.
    """
    x = states.double()
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)


def dimension_statistics(states: torch.Tensor) -> torch.Tensor:
    """(D, F) per-dimension statistics of ``states`` (N, D) after ``_unit_rms``: mean, std, mean |x|, quantiles."""
    x = _unit_rms(states)
    q = torch.quantile(x.float(), torch.tensor(_QUANTILES), dim=0).T.double()  # (D, len(_QUANTILES))
    return torch.cat([x.mean(0)[:, None], x.std(0)[:, None], x.abs().mean(0)[:, None], q], dim=1)


def correlations(states: torch.Tensor) -> torch.Tensor:
    """(D, D) correlation matrix of the dimensions of ``states`` (N, D) after ``_unit_rms``; 0 for constant ones."""
    return torch.corrcoef(_unit_rms(states).T).nan_to_num()


def statistical_matching(
    public: SplitModel,
    traffic: Sequence[Intercept] | torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    seed_step: float = 0.05,
    rounds: int = 40,
    weight: float = 3.0,
    truth: ObfuscationKey | torch.Tensor | None = None,
) -> KeyEstimate:
    """Match per-dimension statistics of intercepted states to those of public states, then refine.

    ``traffic``: intercepts (their uplink rows) or the rows (N, D) themselves, all under one key; repeated
    rows count once. ``reference`` (M, D): public head outputs (default: ``reference_states(public)``).

    First one assignment on the statistics (each scaled by its spread over the reference's dimensions).
    Then seeded graph matching: the most confident pairs so far (largest margin of their cost over the
    next best in their row; ``seed_step`` of D more each round) become seeds, and every model dimension
    i and wire dimension j are also compared by their correlations with the seeds, read through the
    current estimate. Right seeds make right pairs agree, so a partly right start grows. ``weight``: the
    correlation cost against the statistics cost. Stops when all dimensions are seeds and the estimate no
    longer changes, or after ``rounds``; ``details["start_accuracy"]`` is set when ``truth`` is given.
    """
    start = time.perf_counter()
    sent = traffic if isinstance(traffic, torch.Tensor) else torch.cat([item.uplink for item in traffic])
    sent = distinct_rows(sent.float().cpu())
    if reference is None:
        reference = reference_states(public)
    base = feature_cost(dimension_statistics(reference), dimension_statistics(sent))  # (D model, D wire)
    base = base / base.std().clamp_min(1e-12)
    p = assign(base)
    first = p
    plain_corr, sent_corr = correlations(reference).float(), correlations(sent).float()
    d = len(p)
    rows = torch.arange(d)
    cost, done = base, 0
    for done in range(1, rounds + 1):
        inverse = torch.argsort(p)  # inverse[i]: the wire dimension now read as model dimension i
        others = cost.clone()
        others[rows, inverse] = float("inf")
        margin = others.min(dim=1).values - cost[rows, inverse]  # (D,) per model dimension
        count = min(d, round(seed_step * d * done))
        seeds = margin.argsort(descending=True)[:count]
        corr = torch.cdist(plain_corr[:, seeds], sent_corr[:, inverse[seeds]])  # (D model, D wire)
        cost = base + weight * corr.double() / corr.std().clamp_min(1e-12)
        new = assign(cost)
        if count == d and torch.equal(new, p):
            break
        p = new
    details: dict[str, Any] = {"vectors": len(sent), "reference_vectors": len(reference), "rounds": done}
    if truth is not None:
        details["start_accuracy"] = float((first == truth_matrix(truth).argmax(dim=0)).double().mean())
    estimate = KeyEstimate("permutation", permutation_matrix(p), time.perf_counter() - start, details=details)
    return _finish(estimate, truth)


# --- curious cloud: the body's weights ------------------------------------------------------------------


def weight_signatures(body: Body | nn.Module, hidden: int) -> torch.Tensor:
    """(D, F) a signature per hidden dimension that the inner secrets leave unchanged, float64.

    Per body layer: every (D,) norm gain on the residual stream; the column norms of each input-side
    projection (its rows are only permuted or rotated by the inner secrets); the row norms and biases
    of each output-side one (its columns are).
    """
    model = body.model if isinstance(body, Body) else body
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError("the body is empty (X == Y): there are no weights to read a key from")
    features: list[torch.Tensor] = []
    for layer in layers:
        # hidden_norms gives each norm as nn.Module, whose weight reads as Tensor | Module: it is the (D,) gain
        gains = [cast(torch.Tensor, norm.weight) for norm in hidden_norms(layer, hidden).values()]
        features += [g.detach().double().cpu() for g in gains]
        for name, lin in linears(layer).items():
            w = lin.weight.detach().float()  # norms in float32: ~1e-7 relative, far below the gaps between dims
            if name.rsplit(".", 1)[-1] in OUTPUT_SIDE:  # (D, in): W[p, :], columns moved by inner secrets
                features.append(w.norm(dim=1).double().cpu())
                if lin.bias is not None:
                    features.append(lin.bias.detach().double().cpu())
            else:  # (out, D): W[:, p], rows moved or rotated by inner secrets
                features.append(w.norm(dim=0).double().cpu())
    return torch.stack(features, dim=1)


def weight_matching(
    public: SplitModel | Body | nn.Module,
    body: Body | nn.Module,
    *,
    truth: ObfuscationKey | torch.Tensor | None = None,
) -> KeyEstimate:
    """The permutation key of an obfuscated ``body`` from the public weights of the same layers.

    ``public``: a public split holding the body (or the public body itself). Signatures (``weight_signatures``)
    of both are compared after a log (norms span orders of magnitude) and matched by assignment.
    """
    start = time.perf_counter()
    plain = public.body if isinstance(public, SplitModel) else public
    if plain is None:
        raise ValueError("the public split must hold the body's layers (load it with the body part)")
    hidden = _hidden_size(body)
    a, b = weight_signatures(plain, hidden), weight_signatures(body, hidden)
    if a.shape != b.shape:
        raise ValueError(f"the public body has signatures {tuple(a.shape)}, the obfuscated one {tuple(b.shape)}")
    p = assign(feature_cost(_signed_log(a), _signed_log(b)))
    estimate = KeyEstimate(
        "permutation", permutation_matrix(p), time.perf_counter() - start, details={"features": a.shape[1]}
    )
    return _finish(estimate, truth)


def _hidden_size(body: Body | nn.Module) -> int:
    model = body.model if isinstance(body, Body) else body
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "hidden_size"):
        raise ValueError("cannot tell the body's hidden size: pass a Body or an HF model with a config")
    return int(config.hidden_size)


def _signed_log(x: torch.Tensor) -> torch.Tensor:
    """Compress features spanning orders of magnitude (norms of 0.01 to 100), keeping the sign of biases."""
    return torch.sign(x) * torch.log1p(x.abs() * 1e3)


# --- known plaintext ---------------------------------------------------------------------------------


@torch.inference_mode()
def key_from_tokens(
    public: SplitModel,
    intercepts: Sequence[Intercept],
    tokens: Sequence[Sequence[int]],
    kind: KeyKind,
    *,
    truth: ObfuscationKey | torch.Tensor | None = None,
) -> KeyEstimate:
    """The key from recovered tokens: run them through the public head, fit its output to the uplink.

    ``tokens[i]`` are the ids recovered for the first uplink rows of ``intercepts[i]`` (a prompt, or the
    prompt and the generated tokens fed back). A permutation is exact from one state with distinct
    values; a rotation only on the span of the states used (``details["rank"]``).
    """
    start = time.perf_counter()
    head = public_head(public)
    plain, sent = [], []
    for item, ids in zip(intercepts, tokens, strict=True):
        if not ids:
            continue
        n = min(len(ids), item.uplink.shape[0])
        plain.append(head(torch.tensor([list(ids[:n])], device=public.runtime.device))[0].float().cpu())
        sent.append(item.uplink[:n])
    if not plain:
        raise ValueError("no recovered tokens to fit a key on")
    a, b = torch.cat(plain), torch.cat(sent)
    estimate = KeyEstimate(
        kind,
        fit_key(a, b, kind),
        time.perf_counter() - start,
        details={"vectors": len(a), "rank": int(torch.linalg.matrix_rank(a.double()))},
    )
    return _finish(estimate, truth)

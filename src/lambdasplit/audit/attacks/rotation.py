"""A4 against rotation keys: ``h' = h Q`` for a secret random orthogonal ``Q`` (STIP-style, ``privacy.keys``).

STIP ("STIP: Secure Three-Party Transformer Inference", arXiv 2023) transforms the hidden dimension with a
secret matrix and the cloud's weights once to match; a rotation hides value multisets, which the
permutation attacks (``permutation.py``) read. The attacks here are ours:

- ``rotation_from_weights`` (curious cloud): without inner secrets the obfuscated input-side weights are
  ``W diag(g) Q`` and the output side ``Q^T W``, so orthogonal Procrustes against the public, gain-folded
  weights gives ``Q``. Inner secrets multiply each block by an unknown orthogonal row transform ``R``,
  which Gram matrices do not see: ``B^T B = Q^T (A^T A) Q`` for ``B = R A Q``. Two random combinations of
  the Gram matrices of a layer's projections, eigendecomposed, give ``Q = U S U'^T`` up to a sign per
  eigenvector, and the signs follow from the second combination (``s_i s_j M_ij = M'_ij``). Only ``-Q``
  remains, and the FFN's inner secret is a permutation, whose values ``-Q`` would negate.
- ``invariant_matching`` (eavesdropper): rotations keep norms and inner products, so A1's left-to-right
  search works without the key by comparing, for each candidate token, its state's norm and inner products
  with the states of the recovered prefix to those of the intercepted rows. Procrustes on the recovered
  pairs (``permutation.key_from_tokens``) then gives ``Q`` on the span of the states seen.

Shapes: ``D`` hidden size, ``V`` vocabulary, ``T`` positions, ``k`` candidates in one batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from lambdasplit.audit.attacks.exact_matching import NextToken, PrefixMatcher
from lambdasplit.audit.attacks.nearest_neighbour import context_free_tables, positions
from lambdasplit.audit.attacks.permutation import KeyEstimate, _finish, key_from_tokens
from lambdasplit.audit.attacks.result import AttackResult, Side
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.privacy.keys import ObfuscationKey
from lambdasplit.privacy.obfuscate import INPUT_SIDE, PRE_NORMS, hidden_norms, linears, norm_offset
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Body

# --- curious cloud: the body's weights ------------------------------------------------------------------


#: (input or output side, projection name, public weight, obfuscated weight), float64, for one body layer.
Block = tuple[str, str, torch.Tensor, torch.Tensor]


def _blocks(plain: nn.Module, obfuscated: nn.Module, hidden: int, offset: float) -> list[Block]:
    """The projections of one layer on both sides; public input sides times their pre-norm's gain.

    Input side: public ``A = W diag(g)`` (out, D), obfuscated ``B = R A Q``. Output side: public ``C`` (D, in),
    obfuscated ``C' = Q^T C R^T``. ``R``: the inner secrets' row transform (identity without them).
    """
    norms = hidden_norms(plain, hidden)
    theirs = linears(obfuscated)
    out = []
    for name, lin in linears(plain).items():
        w, w_obf = lin.weight.detach().double().cpu(), theirs[name].weight.detach().double().cpu()
        if name.rsplit(".", 1)[-1] in INPUT_SIDE:
            norm = next(n for n, block in PRE_NORMS.items() if name.startswith(block + "."))
            gain = cast(torch.Tensor, norms[norm].weight)  # a norm typed nn.Module: its weight reads as Tensor | Module
            out.append(("in", name, w * (gain.detach().double().cpu() + offset), w_obf))
        else:
            out.append(("out", name, w, w_obf))
    return out


def rotation_from_weights(
    public: SplitModel,
    body: Body,
    *,
    method: str = "auto",
    layers: int = 2,
    seed: int = 0,
    truth: ObfuscationKey | torch.Tensor | None = None,
) -> KeyEstimate:
    """The rotation key of an obfuscated ``body`` from the public weights of the same layers (curious cloud).

    ``method``: ``"procrustes"`` (exact without inner secrets), ``"gram"`` (exact with them, as long as the
    Gram combinations have distinct eigenvalues), or ``"auto"``: Procrustes, then Gram when its relative
    residual exceeds 1e-4. ``layers``: how many body layers are read (one already determines Q).
    ``details``: ``method``, ``residual`` (Procrustes), ``min_gap_over_noise`` (Gram: the smallest eigenvalue
    gap over the eigenvalue mismatch between the two sides; a large value means the eigenvectors are determined).
    """
    start = time.perf_counter()
    if method not in ("auto", "procrustes", "gram"):
        raise ValueError(f"unknown method {method!r}; use auto, procrustes or gram")
    if public.body is None or public.body.model is None or body.model is None:
        raise ValueError("both the public split and the obfuscated body must hold the body's layers")
    hidden, offset = int(public.config.hidden_size), norm_offset(public.config)
    # the decoder layers: nn.Module types an undeclared submodule as Tensor | Module
    plain_layers = cast(nn.ModuleList, public.body.model.layers)
    obf_layers = cast(nn.ModuleList, body.model.layers)
    if len(plain_layers) != len(obf_layers):
        raise ValueError(f"the public body has {len(plain_layers)} layers, the obfuscated one {len(obf_layers)}")
    pairs = list(zip(plain_layers, obf_layers, strict=True))[:layers]
    blocks = [b for p, o in pairs for b in _blocks(p, o, hidden, offset)]
    details: dict[str, object] = {"layers": len(pairs)}
    residual = float("inf")
    if method != "gram":
        q, residual = _procrustes(blocks)
        details.update(method="procrustes", residual=residual)
    if method == "gram" or (method == "auto" and residual > 1e-4):
        q, gap = _gram(blocks, seed)
        details.update(method="gram", min_gap_over_noise=gap)
    estimate = KeyEstimate("rotation", q.float(), time.perf_counter() - start, details=details)
    return _finish(estimate, truth)


def _procrustes(blocks: list[Block]) -> tuple[torch.Tensor, float]:
    """Q maximising tr(Q^T M), M = sum A^T B (input sides, B = A Q) + sum C C'^T (output sides, C' = Q^T C),
    and the relative residual of the fit (0 up to rounding when there are no inner secrets)."""
    m = sum(a.T @ b if side == "in" else a @ b.T for side, _, a, b in blocks)
    u, _, vh = torch.linalg.svd(m)
    q = u @ vh
    err = sum(((a @ q - b) if side == "in" else (q.T @ a - b)).pow(2).sum() for side, _, a, b in blocks)
    total = sum(b.pow(2).sum() for _, _, _, b in blocks)
    return q, float((err / total).sqrt())


def _gram(blocks: list[Block], seed: int) -> tuple[torch.Tensor, float]:
    """Q from Gram matrices (D, D), which the inner secrets' orthogonal row transforms leave unchanged."""
    grams = [(a.T @ a, b.T @ b) if side == "in" else (a @ a.T, b @ b.T) for side, _, a, b in blocks]
    gen = torch.Generator().manual_seed(seed)

    def combination() -> tuple[torch.Tensor, torch.Tensor]:  # the same random mix on both sides
        c = torch.rand(len(grams), generator=gen, dtype=torch.float64)
        mine = sum(ci * g / g.norm() for ci, (g, _) in zip(c, grams, strict=True))
        theirs = sum(ci * h / g.norm() for ci, (g, h) in zip(c, grams, strict=True))
        return mine, theirs

    g, g_obf = combination()
    h, h_obf = combination()
    values, u = torch.linalg.eigh(g)  # ascending on both sides, so the i-th eigenvectors correspond
    values_obf, u_obf = torch.linalg.eigh(g_obf)
    noise = float((values - values_obf).abs().max().clamp_min(1e-300))
    # Q = U S U'^T with S = diag(s); then U^T H U = S (U'^T H' U') S, so s_i s_j = sign(M_ij M'_ij).
    agree = (u.T @ h @ u) * (u_obf.T @ h_obf @ u_obf)  # (D, D) = s s^T times a positive matrix
    signs = torch.sign(torch.linalg.eigh(agree)[1][:, -1])
    q = u @ torch.diag(signs) @ u_obf.T
    return q * _global_sign(blocks, q), float(values.diff().min()) / noise


def _global_sign(blocks: list[Block], q: torch.Tensor) -> float:
    """+1 or -1: Gram matrices cannot tell Q from -Q, but the FFN's rows are only permuted (or not moved),
    so ``B Q^T`` holds the public values for the right sign and their negatives for the wrong one."""
    for side, name, a, b in blocks:
        if side == "in" and name.startswith("mlp."):
            values, mine = a.flatten().sort().values, (b @ q.T).flatten().sort().values
            return 1.0 if (values - mine).norm() <= (values + mine.flip(0)).norm() else -1.0
    return 1.0


# --- eavesdropper: left-to-right matching on invariants -----------------------------------------------------


@dataclass
class _Hypothesis:
    """One candidate prefix: its head matcher (KV cache), its public states, the public model's next-token
    logits after it (None when the public split lacks the body and tail) and its summed distance."""

    matcher: PrefixMatcher
    predictor: NextToken | None = None
    states: list[torch.Tensor] = field(default_factory=list)  # (D,) float64 each
    distance: float = 0.0

    @property
    def logits(self) -> torch.Tensor | None:
        return None if self.predictor is None or self.predictor.logits is None else self.predictor.logits.cpu()

    def fork(self) -> _Hypothesis:
        matcher = copy.copy(self.matcher)  # shares the public model; only the cache and prefix are copied
        matcher.cache = copy.deepcopy(self.matcher.cache)
        matcher.prefix = list(self.matcher.prefix)
        predictor = None if self.predictor is None else self.predictor.fork()
        return _Hypothesis(matcher, predictor, list(self.states), self.distance)

    def extend(self, token: int, distance: float) -> None:
        """Append ``token`` (one head pass for its cache, one body + tail pass for the next logits)."""
        ids = torch.tensor([token])
        state, cache = self.matcher.states(ids)
        self.matcher.extend(ids, 0, cache, state[0])
        self.states.append(state[0].double().cpu())
        self.distance += distance
        if self.predictor is not None:
            self.predictor.step(state[0])


def invariant_features(state: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """(k, 1 + t) float64: squared norm of each ``state`` (k, D) and its inner products with ``prefix`` (t, D)."""
    s = state.double()
    return torch.cat([s.pow(2).sum(-1, keepdim=True), s @ prefix.double().T], dim=-1)


def invariant_matching(
    public: SplitModel,
    intercept: Intercept,
    *,
    side: Side = "prompt",
    wire_dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
    beam: int = 4,
    first_batch: int = 16,
    batch_size: int = 1024,
    max_candidates: int | None = None,
) -> AttackResult:
    """Recover ``side``'s tokens without the key, from invariants of the uplink rows (rotation or permutation).

    For position t the intercepted row's squared norm and inner products with rows 0..t-1 must equal
    those of the candidate's public state with the recovered prefix's public states, within ``rtol``
    times the product of the norms (the right token: ~1e-6 on SmolLM2 over a float32 wire; a wrong one:
    ~0.1 and more). Default ``rtol``: 1e-5, plus twice ``wire_dtype``'s machine epsilon for a wire that
    rounds (each value moves by up to half an ulp, so an inner product by up to that times the norms).
    Candidates come in the order of ``_order`` (the public model's next-token logits, and the lone-token
    tables against what the invariants reveal of the row). Early positions have few invariants, so several
    tokens may match: up to ``beam`` prefixes are kept and later positions rule the wrong ones out (each
    searched in turn with a budget growing 8x from ``first_batch``). A position where no prefix finds a
    match within ``max_candidates`` (default: the whole vocabulary, ~5 s per such position at X = 1 on
    SmolLM2; pass a cap where the rows cannot match, e.g. under noise) takes the closest candidate (a miss).
    ``details``: ``misses`` and ``tried`` as A1, ``ambiguous`` (positions where several tokens matched),
    ``prompt_recovered`` for the output side.
    """
    start = time.perf_counter()
    if rtol is None:
        rtol = 1e-5 + (0.0 if wire_dtype == torch.float32 else 2 * torch.finfo(wire_dtype).eps)
    rows, target = positions(intercept, side)
    uplink = intercept.uplink[: rows.stop].double()
    tables = list(context_free_tables(public).values())  # (V, D) lone-token states; depth X last
    has_model = public.body is not None and public.tail is not None
    hypotheses = [_Hypothesis(PrefixMatcher(public), NextToken(public) if has_model else None)]
    misses, tried_at, ambiguous = [], [], []
    with torch.inference_mode():
        for t, row in enumerate(uplink):
            observed = invariant_features(row[None], uplink[:t])[0]  # (1 + t,)
            norms = uplink[: t + 1].norm(dim=-1)
            scale = rtol * norms[t] * torch.cat([norms[t : t + 1], norms[:t]])  # |h'_t| |h'_s| per feature
            orders = [_order(tables, hyp, observed)[:max_candidates] for hyp in hypotheses]
            done = [0] * len(hypotheses)
            grown: list[tuple[float, int, _Hypothesis]] = []
            closest = (float("inf"), int(orders[0][0]), hypotheses[0])
            budget = first_batch
            while not grown and any(n < len(o) for n, o in zip(done, orders, strict=True)):
                for i, hyp in enumerate(hypotheses):
                    ids = orders[i][done[i] : budget]
                    hits, best, count = _search(hyp, ids, observed, scale, batch_size)
                    done[i] += count
                    grown += [(d, token, hyp) for d, token in hits]
                    closest = min(closest, (*best, hyp), key=lambda c: c[0])
                budget *= 8
            tried_at.append(sum(done))
            if len(grown) > 1:
                ambiguous.append(t)
            if not grown:  # no prefix explains this row: keep the closest candidate of the best prefix
                misses.append(t)
                grown = [closest]
            hypotheses = []
            for distance, token, hyp in sorted(grown, key=lambda g: g[2].distance + g[0])[:beam]:
                forked = hyp.fork()
                forked.extend(token, distance)
                hypotheses.append(forked)
    recovered = hypotheses[0].matcher.prefix
    p = rows.start
    details: dict[str, object] = {
        "misses": [i - p for i in misses if i >= p],
        "tried": tried_at[p:],
        "ambiguous": [i - p for i in ambiguous if i >= p],
    }
    if side == "output":
        details["prompt_recovered"] = recovered[:p]
        details["prompt_misses"] = [i for i in misses if i < p]
    return AttackResult(
        attack="invariant_matching",
        side=side,
        recovered=recovered[p:],
        target=target,
        seconds=time.perf_counter() - start,
        details=details,
    )


def _order(tables: list[torch.Tensor], hyp: _Hypothesis, observed: torch.Tensor) -> torch.Tensor:
    """(V,) token ids, most promising first, from rankings interleaved (each token placed by its best rank).

    At t = 0: how close each lone-token state's norm is to the row's (exact at position 0). Later: the
    public model's next-token logits after ``hyp``'s prefix, and for each lone-token ``tables`` (V, D) the
    cosine with the row's projection onto the prefix's span, which the invariants give in public
    coordinates: ``h_par = c P`` with ``(P P^T) c = (<h'_t, h'_s>)_s``. It sharpens as the span grows.
    """
    t = len(hyp.states)
    if t == 0:
        return (tables[-1].double().norm(dim=-1) - observed[0].sqrt()).abs().argsort()
    plain = torch.stack(hyp.states)  # (t, D) public states of the prefix
    coefficients = torch.linalg.lstsq(plain @ plain.T, observed[1:, None]).solution[:, 0]
    projection = (coefficients @ plain).float()  # (D,)
    rankings = [
        (nn.functional.normalize(table.float(), dim=-1) @ projection).argsort(descending=True) for table in tables
    ]
    if hyp.logits is not None:
        rankings.insert(0, hyp.logits.argsort(descending=True))
    vocab = len(rankings[0])
    place = torch.empty(len(rankings), vocab, dtype=torch.long)
    for i, ranking in enumerate(rankings):
        place[i, ranking] = torch.arange(vocab) * len(rankings) + i
    return place.min(dim=0).values.argsort()


def _search(
    hyp: _Hypothesis, ids: torch.Tensor, observed: torch.Tensor, scale: torch.Tensor, batch_size: int
) -> tuple[list[tuple[float, int]], tuple[float, int], int]:
    """Run candidates ``ids`` after ``hyp``'s prefix, ``batch_size`` at a time, until a batch holds matches.

    Returns ((distance, token) per match in that batch, (closest distance, its token), candidates tried).
    The distance is the largest feature mismatch in units of ``scale`` (<= 1: a match).
    """
    best, tried = (float("inf"), -1), 0
    for chunk in ids.split(batch_size):
        states, _ = hyp.matcher.states(chunk)
        states = states.cpu()
        prefix = torch.stack(hyp.states) if hyp.states else states.new_zeros(0, states.shape[1])
        distance = ((invariant_features(states, prefix) - observed).abs() / scale).amax(dim=-1)  # (k,)
        tried += len(chunk)
        index = int(distance.argmin())
        best = min(best, (float(distance[index]), int(chunk[index])))
        hits = [(float(distance[i]), int(chunk[i])) for i in (distance <= 1).nonzero()[:, 0].tolist()]
        if hits:
            return hits, best, tried
    return [], best, tried


def procrustes_key(
    public: SplitModel,
    intercepts: Sequence[Intercept],
    tokens: Sequence[Sequence[int]],
    *,
    truth: ObfuscationKey | torch.Tensor | None = None,
) -> KeyEstimate:
    """The rotation from recovered ``tokens`` (per intercept): orthogonal Procrustes on (public state, uplink row).

    Exact on the span of those states only: one prompt of T tokens fixes Q on a T-dimensional subspace;
    on SmolLM2 (D = 576) about 800 distinct states of chat traffic pin all of it.
    """
    return key_from_tokens(public, intercepts, tokens, "rotation", truth=truth)

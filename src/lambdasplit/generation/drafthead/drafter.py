"""``HeadDrafter``: speculative drafts from a trained draft head, with no round trip.

The split's tail runs on the device, so the model's last hidden state at every position it decodes is already
here (``SplitDecoder.keep_features``). The head keeps its own KV cache over pairs (feature at position j, token at
j + 1) for the generation's answer so far, starting at the prompt's last position; each step it takes in the
pairs the last verification settled, then drafts up to ``length.k_max`` tokens feeding its own guesses back,
and forgets those guesses at the next step. A head trained with ``head_layers`` also reads what the device's head
(the model's first layers, whose KV cache holds the whole context) makes of each token: the decoder kept it for
the tokens it fed, and computes it for the next token and each guess (``SplitDecoder.look_ahead``, one row through
those layers); the FORWARD that verifies the guesses reuses those rows, so the device's head runs once on each
token sent. The head computes in ``drafting_dtype`` (bfloat16 on a CPU with native bf16): drafting 8 guesses took
34 ms a step on this VM, against 42 in float32 with the head recomputing the sent rows. On such a CPU it also
drafts with int8 weights (``quantized``, ``head_drafter(int8=)``): its own products, and the look-ahead through an
int8 copy of the device's head, whose rows then serve drafting only (the verification runs the head itself on every
row it sends, in one pass under the tree's mask). In process over a link that waits 0.3 s a step, 2 MT-Bench
prompts, one thread: drafting 26.1 ms a step against 42.9, a whole step 406.5 ms against 427.5, the same tokens a
step (2.57).

Drafts are greedy over the head's draft vocabulary: a point-mass draft, which the acceptance rule
(``speculative.verify``) needs to keep the sampling distribution unchanged.

How many of them to send is decided each step from what they are worth and what they cost. The head's
probability of its own guess is a usable estimate of acceptance (the shipped head on 20 MT-Bench answers, 1,199
steps: first guesses it gave >= 0.9 were accepted 91% of the time, 0.4-0.5: 41%, < 0.1: 9%); the product along the draft
estimates that a whole prefix is accepted. The expected count is scaled by how the estimates fared so far with
this drafter (accepted / expected), and ``StepCost`` turns it into the count with the most expected tokens per
second: the longer the round trip, the more it sends (2.91 drafted tokens a step over 30 ms, 3.47 over 250 ms, on
MT-Bench, copies included). Where steps are not timed (the first step, which also fills the head's cache; seeded
sampling, whose output must not depend on the clock), the guesses whose prefix probability is at least
``sure_enough`` are sent.

Where the decoder verifies token trees (``split.tree``: in process, and over a server whose WELCOME says
``"trees": true``), the head also offers its next ``alternatives`` guesses at each position (default 2), each worth
the chain's probability up to the position before times its own. All the guesses are ranked by that worth and the
cost model picks how many of the best to send, as for a chain: a tree whose branches are the chain and, at some
positions, the runners-up as leaves (no more drafting: they come from the same softmax). The model keeps the branch
it agrees with (``speculative.verify_tree``); a tree's rows cost what a chain's rows cost, so the choice is priced
the same way. Where trees cannot be verified the head drafts chains. ``grow`` (off by default) also takes the head's
step after the runners-up it would send, all in one forward, so their own next guesses can join the tree
(EAGLE-2's expansion, one level): it lifts the tokens a step keeps where rows cost little (2.40 to 2.57 in process,
rows free) and costs more than it gains at this CPU's prices.

The head's own cache starts at the prompt's last position (it sees the prompt only through the first layers'
states, if it reads them), and a small head guesses a numbered list's next "**3." less surely than a copy would.
So each step it also looks up a copy (prompt lookup: the tokens that followed the latest earlier occurrence of the
last 1-3 tokens). A copy's chance of being accepted is learnt from how copies fared in this generation, by the
length of the match (a prior of 0.5 per token, worth two copies, before any evidence). In a tree, the copy's tokens
are more branches (a token the head guessed too, at the same place, is one node worth the higher estimate), ranked
and priced with the guesses, and the verification keeps whichever branch the model agrees with; as a chain, the
head's guesses or the copy go, whichever the cost model values more. Either way the draft is a point mass that
depends only on the ids so far (the states too are the model's own layers over those ids), so the sampling rule
is unchanged.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
from transformers import Cache

from lambdasplit.config import Runtime
from lambdasplit.errors import ConfigError
from lambdasplit.generation.drafthead.model import DraftHead, HeadInfo, target_matrices
from lambdasplit.generation.drafthead.quantized import cpu_bfloat16, drafting_copy, int8_drafting
from lambdasplit.generation.drafting import Drafter, DraftLength, PromptLookupDrafter, StepCost
from lambdasplit.generation.session import Decoder, SplitDecoder
from lambdasplit.split.loader import SplitModel
from lambdasplit.split.parts import Head, rewind
from lambdasplit.split.tree import aside_mask


@dataclass
class _Node:
    """A token the drafter could send, by its path from the last token: the head's prefix probability for it (None:
    not the head's), the chance that a copy's tokens up to it are all accepted (None: not the copy's), and whether it
    is on the head's chain (whose look-ahead rows the verification reuses)."""

    path: tuple[int, ...]
    sure: float | None = None
    copy: float | None = None
    chain: bool = False


class HeadDrafter(Drafter):
    name = "head"

    #: Drafting stops after the first guess whose prefix is this unlikely to be accepted (a guess costs about 4 ms).
    floor = 0.02
    #: Untimed steps send the guesses whose prefix is at least this likely to be accepted.
    sure_enough = 0.3
    #: Before any evidence, a copy's first i tokens are accepted with probability ``copy_prior ** i``; the prior
    #: weighs as much as ``copy_prior_weight`` copies sent.
    copy_prior = 0.5
    copy_prior_weight = 2.0
    #: A grown guess's worth is about this share of its runner-up's, before growing (to decide whether to grow).
    grow_odds = 0.5

    def __init__(
        self,
        head: DraftHead,
        length: DraftLength | None = None,
        *,
        info: HeadInfo | None = None,
        cost: StepCost | None = None,
        lookup: bool = True,
        alternatives: int = 2,
        grow: int = 0,
        look_ahead: Head | None = None,
    ) -> None:
        # ``look_ahead``: a cheaper copy of the device's head to look ahead through while drafting (``head_drafter``'s
        # int8 copy); None: the head itself, whose rows the verification then reuses.
        # Adaptive (the default): up to ``length.k_max`` guesses a step, and the cost model picks how many are sent,
        # the head's or (``lookup``) a copy; ``adaptive=False`` sends ``length.k`` of the head's every step.
        # ``alternatives``: up to that many of the head's next guesses at each position as well, sent as a token
        # tree where the decoder verifies trees (adaptive drafting only). ``grow``: where trees are verified, the
        # head also takes one step after up to that many of the runners-up it would send (``_grow``), when the cost
        # model finds it worth the time; off by default: it pays where rows cost little (see ``_grow``).
        super().__init__(length or DraftLength(k=8, k_min=1, k_max=8))
        if alternatives < 0 or grow < 0:
            raise ConfigError(f"alternatives and grow must be >= 0, got {alternatives} and {grow}")
        self.alternatives, self.grow, self.look_ahead = alternatives, grow, look_ahead
        self._alts: list[list[tuple[int, float]]] = []  # per drafted position: the head's next guesses, probability
        self._grown: list[_Node] = []  # the last draft's guesses after runners-up (``grow``)
        self._hiddens: list[torch.Tensor] = []  # the head's output before each guess of the last draft
        self._grow_seconds: float | None = None  # what growing took (moving average; None: not measured yet)
        self.cost = cost or StepCost()
        self.head, self.info = head, info
        self.lookup = PromptLookupDrafter(max_ngram=3, min_ngram=1) if lookup else None
        #: Steps whose draft came from the head and from a copy (in this drafter's life).
        self.drafts_from = {"head": 0, "lookup": 0}
        self._sent: list[_Node] = []  # the last draft's tokens, in the order sent
        self._match = 0  # the last copy's match length, in tokens
        # match length -> (copies sent with more than i tokens, copies with more than i accepted), i < k_max
        self._copies: dict[int, tuple[list[int], list[int]]] = {}
        self._sure: list[float] = []  # the last draft's prefix probabilities, as the head sees them
        self._expected = self._accepted = 0.0  # expected and accepted drafted tokens so far
        self._timed = False  # whether steps are timed: the cost model decides (not on the first step)
        self._steps = 0  # steps since attach
        self.decoder: SplitDecoder | None = None
        self._cache: Cache | None = None
        self._ids: list[int] = []  # ids[base + 1 .. fed] entered the head's cache, with their features
        self._base = self._fed = 0

    def attach(self, decoder: Decoder) -> None:
        if not isinstance(decoder, SplitDecoder) or decoder.split.tail is None or not decoder.use_cache:
            raise ConfigError(
                "the head drafter reads the model's last hidden state on the device: it needs a cached split "
                "decoder with the tail here (not the unsplit model, STIP's layout or --no-cache)"
            )
        if self.head is not None:
            _check_cut(self.head, decoder.split)
        self.decoder = decoder
        decoder.keep_features = True
        decoder.look_ahead_head = self.look_ahead
        self._cache, self._timed, self._steps = None, False, 0

    @property
    def calibration(self) -> float:
        """Accepted over expected drafted tokens so far (1 before any evidence; smoothed, kept in [0.25, 1.5])."""
        return min(1.5, max(0.25, (self._accepted + 2.0) / (self._expected + 2.0)))

    def draft(self, ids: Sequence[int], limit: int) -> list[int]:
        return self._draft(ids, limit, trees=False)[0]

    def draft_tree(self, ids: Sequence[int], limit: int) -> tuple[list[int], list[int]]:
        return self._draft(ids, limit, trees=True)

    def _draft(self, ids: Sequence[int], limit: int, trees: bool) -> tuple[list[int], list[int]]:
        k = min(self.length.k_max if self.length.adaptive else self.length.k, limit)
        self._sent, self._grown = [], []
        if k <= 0:
            self._sure = []
            return [], []
        guesses = self.propose(ids, k)
        if not self.length.adaptive:  # a fixed length: k guesses every step, whatever they cost
            self._sent = [_Node(tuple(guesses[: i + 1]), p, None, True) for i, p in enumerate(self._sure)]
            return guesses, list(range(len(guesses)))
        copied, self._match = self.lookup.match(ids, k) if self.lookup is not None else ([], 0)
        copy = [_Node(tuple(copied[: i + 1]), None, p) for i, p in enumerate(self._copy_odds(self._match, len(copied)))]
        head = self._nodes(guesses, trees)
        if trees and self.decoder is not None and self.decoder.trees:
            sent, rate = self._best(self._merged(head, copy))
            if self.grow:  # the likeliest runners-up about to be sent
                picks = sorted((n for n in sent if n.sure is not None and not n.chain), key=lambda n: -(n.sure or 0.0))
                if self._worth_growing(picks[: self.grow], rate, len(sent)):
                    self._grown = self._grow(picks[: self.grow])
            if self._grown:
                sent, _ = self._best(self._merged(head + self._grown, copy))
        else:  # a chain: the head's guesses or the copy, whichever is worth more
            sent, score = self._best(head)
            copied_nodes, copy_score = self._best(copy)
            if copied_nodes and copy_score > score:
                sent = copied_nodes
        # Rows: the head's chain first (its look-ahead rows are reused), then by depth: parents before children.
        self._sent = sorted(sent, key=lambda node: (not node.chain, len(node.path)))
        row = {(): 0} | {node.path: i + 1 for i, node in enumerate(self._sent)}  # every parent is sent before
        for source, field in (("head", "sure"), ("lookup", "copy")):
            self.drafts_from[source] += any(getattr(node, field) is not None for node in self._sent)
        return [node.path[-1] for node in self._sent], [row[node.path[:-1]] for node in self._sent]

    def _nodes(self, guesses: list[int], trees: bool) -> list[_Node]:
        """Every guess the head could send: the chain (its prefix probabilities, ``_sure``) and, with ``trees``
        where the decoder verifies them, ``alternatives`` more at each position (the chain's probability up to the
        position before, times the guess's own). A guess is never likelier than the one it follows."""
        nodes = [_Node(tuple(guesses[: i + 1]), p, None, True) for i, p in enumerate(self._sure[: len(guesses)])]
        if trees and self.alternatives > 0 and self.decoder is not None and self.decoder.trees:
            for i, options in enumerate(self._alts[: len(nodes)]):
                before = self._sure[i - 1] if i else 1.0
                nodes += [_Node((*guesses[:i], g), before * p) for g, p in options[: self.alternatives]]
        return nodes

    @staticmethod
    def _merged(head: list[_Node], copy: list[_Node]) -> list[_Node]:
        """The head's guesses and the copy's tokens as one tree: a token both offer at the same path is one node."""
        nodes = {node.path: node for node in head}
        for node in copy:
            if node.path in nodes:
                nodes[node.path].copy = node.copy
            else:
                nodes[node.path] = node
        return list(nodes.values())

    def _worth(self, node: _Node) -> float:
        """The chance a node is accepted: the head's estimate (calibrated) or the copy's, whichever is higher."""
        return max(self._gain(node.sure) if node.sure is not None else 0.0, node.copy or 0.0)

    def _best(self, nodes: list[_Node]) -> tuple[list[_Node], float]:
        """The nodes worth sending and what they are worth. Ranked by worth (a node is never worth more than its
        parent, so every prefix of the ranking is a tree): the count with the most expected tokens a second (and
        that rate), or where steps are not timed the nodes at least ``sure_enough`` likely (and their count)."""
        ranked = sorted(nodes, key=lambda node: (-self._worth(node), len(node.path), not node.chain))
        if self._timed:
            n, rate = self.cost.best(list(accumulate(self._worth(node) for node in ranked)))
            return ranked[:n], rate
        n = sum(1 for node in ranked if self._worth(node) >= self.sure_enough)
        return ranked[:n], float(n)

    def update(
        self, accepted: int, drafted: int, seconds: float | None = None, kept: Sequence[int] | None = None
    ) -> None:
        if seconds is not None and self._steps > 0:  # the first step also filled the head's cache: not a price
            self.cost.observe(drafted, seconds)
        self._steps += 1
        self._timed = seconds is not None
        sent = self._sent[:drafted]
        held = {sent[r].path for r in (kept if kept is not None else range(accepted)) if r < len(sent)}
        copies = [node for node in sent if node.copy is not None]  # a prefix of the copy, by construction
        if copies:
            tried, won = self._copies.setdefault(self._match, ([0] * self.length.k_max, [0] * self.length.k_max))
            for node in copies:
                if len(node.path) <= len(tried):
                    tried[len(node.path) - 1] += 1
                    won[len(node.path) - 1] += node.path in held
        guesses = [node.sure for node in sent if node.sure is not None]
        self._expected += sum(guesses)
        self._accepted += sum(1 for node in sent if node.sure is not None and node.path in held)

    def _gain(self, sure: float) -> float:
        """Expected accepted tokens a guess adds, from its prefix probability as the head sees it (calibrated)."""
        return min(1.0, self.calibration * sure)

    def _copy_odds(self, match: int, length: int) -> list[float]:
        """The chance that a copy's first 1 .. ``length`` tokens are accepted, after a ``match``-token match: from
        the copies after such matches so far, with the prior (never rising with length)."""
        sent, kept = self._copies.get(match, ([0] * length, [0] * length))
        odds, last = [], 1.0
        for i in range(length):
            seen = (sent[i], kept[i]) if i < len(sent) else (0, 0)
            prior = self.copy_prior ** (i + 1)
            last = min(last, (seen[1] + self.copy_prior_weight * prior) / (seen[0] + self.copy_prior_weight))
            odds.append(last)
        return odds

    @torch.inference_mode()
    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        decoder = self.decoder
        if decoder is None:
            raise ConfigError("the head drafter was not attached to a decoder (Generation does this)")
        self._sure = []
        feats = decoder.features
        end = decoder.length  # positions the model holds; ids[end] is the token fed next
        if feats.rows is None or feats.end < end:
            return []  # no features for the latest positions (cannot happen inside Generation)
        ids = list(ids)
        fresh = self._cache is None or not feats.first <= self._fed <= end
        if fresh or self._ids[: self._fed + 1] != ids[: self._fed + 1]:  # a new sequence: start at its features
            self._cache, self._base = self.head.new_cache(), feats.first
            self._fed = self._base
        assert self._cache is not None
        rewind(self._cache, self._fed - self._base)  # the last draft's guesses leave the head's cache
        first = self._fed
        rows = feats.span(first, end)
        assert rows is not None
        states = None
        if self.head.head_layers:  # the head's output at the tokens fed: kept by the decoder, then ids[end]'s
            held = decoder.states.span(first + 1, end)
            if held is None:
                return []
            states = torch.cat([held, decoder.look_ahead(ids[end : end + 1], end)])[None]
        tokens = torch.tensor([ids[first + 1 : end + 1]], device=rows.device)
        positions = torch.arange(first + 1, end + 1, device=rows.device)[None]
        hidden = self.head(tokens, rows[None], positions, self._cache, states=states)[:, -1:]
        self._fed, self._ids = end, ids[: end + 1]
        # The rows now in the head's cache are not needed again: the decoder keeps only what comes next.
        feats.forget_before(end)
        decoder.states.forget_before(end)
        out: list[int] = []
        expected: list[float] = []
        sure = 1.0
        self._alts, self._hiddens = [], []
        for i in range(k):
            self._hiddens.append(hidden)
            p, at = torch.softmax(self.head.logits(hidden[0, -1]).float(), dim=-1).topk(1 + self.alternatives)
            ranked = [(int(self.head.draft_ids[a]), float(q)) for a, q in zip(at.tolist(), p, strict=True)]
            out.append(ranked[0][0])
            self._alts.append(ranked[1:])
            sure *= ranked[0][1]
            self._sure.append(sure)
            if i + 1 == k or (self.length.adaptive and not self._worth_more(sure, expected, k)):
                break
            step = torch.tensor([[out[-1]]], device=hidden.device)
            # What the device's head makes of the guess, in context (its KV cache holds the guesses before it).
            state = decoder.look_ahead(out[-1:], end + 1 + i)[None] if self.head.head_layers else None
            position = torch.tensor([[end + 1 + i]], device=hidden.device)
            hidden = self.head(step, hidden, position, self._cache, states=state)
        return out

    def _worth_growing(self, runners_up: list[_Node], rate: float, sent: int) -> bool:
        """Whether the head's step after ``runners_up`` (runners-up about to be sent) is worth its time: each could
        grow a guess worth about ``grow_odds`` of its own worth (a guess is never worth more than the one it
        follows), which pays where that beats what the cost model pays for a row at this count (its tokens a second
        times the next row's seconds); the surplus must beat what growing costs (its seconds, measured, at the same
        rate). Untimed steps: a guess at least ``sure_enough`` likely could grow."""
        if not runners_up:
            return False
        if not self._timed:
            return any(self._worth(node) * self.grow_odds >= self.sure_enough for node in runners_up)
        now, more = self.cost.estimate(sent), self.cost.estimate(sent + 1)
        price = rate * (max(0.0, more - now) if now is not None and more is not None else 0.0)
        surplus = sum(max(0.0, self._worth(node) * self.grow_odds - price) for node in runners_up)
        return surplus > rate * (self._grow_seconds or 0.0)

    @torch.inference_mode()
    def _grow(self, runners_up: list[_Node]) -> list[_Node]:
        """The head's next guesses after ``runners_up`` (EAGLE-2's expansion, one level deep), right after
        ``propose`` drafted the chain: a runner-up at position ``end + 1 + i`` is fed as the chain's guess there was,
        after the chain's first ``i`` guesses, all side by side in one forward (the device's head, then this head,
        under masks), and its next ``alternatives`` guesses are nodes worth its prefix probability times their own.
        Both caches are left as they were.

        What it is worth (``benchmarks/draft_head_priced.py``: 10 MT-Bench prompts in process, the cost model's
        prices frozen): with rows free, so that every guess considered is sent, 2.57 tokens a step with ``grow=8``
        against 2.40 without; at this CPU's prices over 5g and wireless, 0-1.6% more tokens a step for about as much
        time. Live over both links (``benchmarks/draft_head.py``, 20 prompts) it sent 1.2-3.0 more rows a step,
        kept 2.22 and 2.32 tokens against 2.21 and 2.29, and was 3-4% slower. So it is off by default."""
        decoder, cache, hiddens = self.decoder, self._cache, self._hiddens
        if not runners_up or decoder is None or cache is None or self.alternatives == 0:
            return []
        started = time.perf_counter()
        end = decoder.length
        depth = [len(node.path) - 1 for node in runners_up]
        tokens = torch.tensor([[node.path[-1] for node in runners_up]], device=hiddens[0].device)
        states = (
            decoder.look_aside(tokens[0].tolist(), [end + 1 + i for i in depth])[None]
            if self.head.head_layers
            else None
        )
        held = cache.get_seq_length()  # the true pairs, then the chain's guesses fed (one per position after end)
        mask = aside_mask([held - (len(hiddens) - 1) + i for i in depth], held, self.head.dtype, tokens.device)
        features = torch.cat([hiddens[i] for i in depth], dim=1)
        positions = torch.tensor([[end + 1 + i for i in depth]], device=tokens.device)
        try:
            out = self.head(tokens, features, positions, cache, attention_mask=mask, states=states)
        finally:
            rewind(cache, held)
        p, at = torch.softmax(self.head.logits(out[0]).float(), dim=-1).topk(self.alternatives)
        took = time.perf_counter() - started
        last = self._grow_seconds
        self._grow_seconds = took if last is None else last + self.cost.smoothing * (took - last)
        return [
            _Node((*node.path, int(self.head.draft_ids[a])), (node.sure or 0.0) * float(q))
            for node, row_p, row_at in zip(runners_up, p, at, strict=True)
            for q, a in zip(row_p, row_at.tolist(), strict=True)
        ]

    def _worth_more(self, sure: float, expected: list[float], k: int) -> bool:
        """Whether another guess could be sent (``draft``'s rule), given the latest prefix's probability: later
        prefixes are no likelier, so once none could be sent, drafting stops (a guess costs about 4 ms here)."""
        if sure < self.floor:
            return False
        if not self._timed:
            return sure >= self.sure_enough
        gain = self._gain(sure)
        expected.append((expected[-1] if expected else 0.0) + gain)
        return self.cost.could_gain(expected, gain, k)

    def close(self) -> None:
        self._cache, self._ids, self._fed, self._sure, self._hiddens = None, [], 0, [], []
        if self.lookup is not None:
            self.lookup.close()
        if self.decoder is not None:
            self.decoder.keep_features = False
            self.decoder.look_ahead_head = None
            self.decoder = None


def _check_cut(head: DraftHead, split: SplitModel) -> None:
    """A head that reads the first N layers' states needs a device head of N layers."""
    layers = split.head.num_layers if split.head is not None else 0
    if head.head_layers and layers != head.head_layers:
        raise ConfigError(
            f"this draft head reads the output of the model's first {head.head_layers} layers, and the device's "
            f"head runs {layers}: cut the model at {head.head_layers} (--layers {head.head_layers}:...) or train a "
            f"head for this cut (benchmarks/train_draft_head.py --head-layers {layers})"
        )


#: Heads loaded so far, shared by the drafters made for them (an agent makes one per request): a head is read-only
#: while drafting (each drafter keeps its own KV cache), so concurrent generations can share it.
_LOADED: dict[tuple[str, int, str, object, torch.dtype, bool], tuple[DraftHead, HeadInfo]] = {}
#: The int8 copies of device heads made for looking ahead (``quantized.drafting_copy``), by the head they copy.
_COPIES: weakref.WeakKeyDictionary[Head, Head] = weakref.WeakKeyDictionary()


def drafting_dtype(runtime: Runtime) -> torch.dtype:
    """What a draft head computes in: bfloat16 on a CPU that computes it natively (the head's step for a guess took
    2.1 ms against 3.0 in float32 on this VM's avx512_bf16, with the same guesses nearly always), else the model's
    dtype. Drafts only propose tokens: the model's verification keeps the output what it is whatever they are."""
    if runtime.device.type == "cpu" and runtime.dtype == torch.float32 and cpu_bfloat16():
        return torch.bfloat16
    return runtime.dtype


def head_drafter(
    split: SplitModel,
    path: str | Path | None = None,
    length: DraftLength | None = None,
    *,
    lookup: bool = True,
    dtype: torch.dtype | None = None,
    alternatives: int = 2,
    grow: int = 0,
    int8: bool | None = None,
) -> HeadDrafter:
    """The draft head at ``path`` (default: the one shipped for the embedded SmolLM2-135M-Instruct), for ``split``,
    computing in ``dtype`` (default: ``drafting_dtype``); ``lookup=False``: its guesses only, never a copy;
    ``alternatives`` and ``grow`` as ``HeadDrafter`` takes them. ``int8``: the head's products, and the look-ahead
    through the device's head, with int8 weights (``quantized``; default: ``int8_drafting``, where the CPU computes
    bfloat16 natively)."""
    from lambdasplit.generation.drafthead import HEAD_FILE

    if split.head is None or split.tail is None or split.head.model is None or split.tail.model is None:
        raise ConfigError(
            "the head drafter needs the split's head and tail in this process (STIP's layout has no tail)"
        )
    embed, lm_head = target_matrices(split.head.model, split.tail.model)
    file = Path(path) if path is not None else HEAD_FILE
    dtype = dtype or drafting_dtype(split.runtime)
    int8 = int8_drafting(split.runtime) if int8 is None else int8
    stamp = file.stat().st_mtime_ns if file.is_file() else 0
    key = (str(file.resolve()), stamp, split.fingerprint, split.runtime, dtype, int8)
    try:
        if key not in _LOADED:
            while len(_LOADED) >= 4:  # a few models or heads at once; each holds references to its model's weights
                _LOADED.pop(next(iter(_LOADED)))
            head, info = DraftHead.load(file, split.config, embed, lm_head, dtype)
            head = head.to(split.runtime.device)
            if int8:
                head.quantize()
            _LOADED[key] = head, info
        head, info = _LOADED[key]
    except ConfigError as e:
        if path is not None:
            raise
        raise ConfigError(
            f"{e}. The shipped head fits the embedded smollm2-135m-instruct only: train one for this model with "
            "benchmarks/train_draft_head.py and pass --speculative head:PATH"
        ) from None
    _check_cut(head, split)
    look_ahead = None
    if int8 and head.head_layers:
        if split.head not in _COPIES:
            _COPIES[split.head] = drafting_copy(split.head)
        look_ahead = _COPIES[split.head]
    return HeadDrafter(
        head, length, info=info, lookup=lookup, alternatives=alternatives, grow=grow, look_ahead=look_ahead
    )

"""The audit's strongest attack for one deployment, run live on what one conversation sent.

``lambdasplit up`` gives ``LiveAttacker`` to the device agent, whose attacker panel (``agent/attack_panel.py``)
hands it each finished turn as an observer of the link has it (``Heard``: the uplink and downlink rows
decoded from the frames as sent, the prefill's row count, the wire dtype) and scores what comes back
against the truth, which only the device knows. The attacks are this package's, unchanged:

- prompt side: A1 exact matching through the public head (``attacks/exact_matching.recover``), the
  strongest attack on the prompt without a key: 99.7-100% of prompt tokens at X = 0-8 (docs/threat-model.md);
- output side: B3, the public tail replayed on the downlink (B1) with each token confirmed on the uplink row
  it was fed back as (``attacks/sampled_tokens``): 100% of greedy tokens, and the sampled ones too.

With no key the eavesdropper (on a link without TLS) and the curious cloud see the same states and hold the
same public weights, so one attack stands for both. With a key (``--key``) these attacks read nothing until
the key is recovered. A permutation key is recovered first from the same traffic by A4 sorted matching
(``attacks/permutation.sorted_matching``, the eavesdropper's attack: 100% of the key over float16 in the
audit), then undone; the cloud's own, faster route (the key read off the body's weights) is quoted, not run.
For a rotation key (the eavesdropper's invariant matching took 61-509 s per prompt in the audit) and any other
transform, nothing runs: the readback says so and quotes the audit's figures.

``public`` holds the public weights at the deployment's split points: head and tail, and under a permutation
key the body too (A4 ranks candidates by the public model's next token). The device's own head and tail are
the public ones, key or not: a key transforms the body and the wire (``privacy.obfuscate``). The attacks keep
their own KV caches, so sharing the device's split is safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from lambdasplit.audit.attacks.exact_matching import recover
from lambdasplit.audit.attacks.nearest_neighbour import context_free_tables
from lambdasplit.audit.attacks.permutation import decode_with, sorted_matching
from lambdasplit.audit.attacks.sampled_tokens import sampled_tokens
from lambdasplit.privacy.intercept import Intercept
from lambdasplit.split.loader import SplitModel
from lambdasplit.wire import WireDtype

A1 = "A1 exact matching (public head)"
B3 = "B3 tail replay, confirmed on the uplink (public tail and head)"
A4 = "A4 sorted matching (the key, from this traffic), then "

#: What the audit measured where no live attack runs (docs/threat-model.md), said instead of a live figure.
KEYED_PROMPT = {
    "rotation": (
        "a secret rotation stops A1 without the key (0%), but not the attackers: the curious cloud recovers the "
        "rotation from the body's own weights (100%, about a second) and then reads 99.7-100% of prompt tokens; "
        "an eavesdropper needs no key: invariant matching read 100% of prompt tokens (61-509 s per prompt; "
        "docs/threat-model.md). Not run live here."
    ),
}
KEYED_OUTPUT = (
    "with the key recovered (above), tail replay reads 100% of generated tokens (docs/threat-model.md). "
    "Not run live here."
)
#: A permutation key read back live: what the curious cloud does instead, faster.
PERMUTATION_NOTE = (
    "the key was recovered from this conversation's own first rows, as an eavesdropper without TLS can; the "
    "curious cloud needs no traffic for it: it reads the key off the body's weights in about a second "
    "(docs/threat-model.md)"
)


class Heard(Protocol):
    """One conversation as an observer of the link has it (``agent.attack_panel.Overheard``)."""

    @property
    def uplink(self) -> torch.Tensor: ...  # (T, D) float32, as sent

    @property
    def downlink(self) -> torch.Tensor: ...  # (T, D) float32, as returned; (0, D) when not aligned

    @property
    def prompt_length(self) -> int: ...  # rows of the prefill frame

    @property
    def wire_dtype(self) -> WireDtype: ...


@dataclass(frozen=True)
class Readback:
    """What one attack recovered from one side (``ids`` None: not run, ``note`` says why and what is known)."""

    side: Literal["prompt", "output"]
    attack: str
    ids: list[int] | None
    seconds: float = 0.0
    note: str = ""


def tolerance_dtype(wire: WireDtype) -> torch.dtype | None:
    """The dtype A1's tolerance is computed for (``exact_matching.tolerance``): float wires and int8."""
    if wire is WireDtype.QINT8:
        return torch.int8
    return wire.torch_dtype


class LiveAttacker:
    """A1 on the prompt and B3 on the answer; under a permutation key, A4 sorted matching first.

    ``key_kind``: the deployment's key (``"permutation"``, ``"rotation"``, or another name, which is said and
    not attacked), None for a plain split. Under a permutation key ``public`` should hold the body as well:
    A4 ranks candidates by the public model's next token, without which its search is much longer.
    ``max_candidates``: A1's budget per position (a position with no match costs that many head passes).
    """

    def __init__(self, public: SplitModel, *, key_kind: str | None = None, max_candidates: int = 4096) -> None:
        if public.head is None or public.tokenizer is None:
            raise ValueError(f"the attacker's public model {public.name!r} needs its head and tokenizer")
        self.public, self.key_kind, self.max_candidates = public, key_kind, max_candidates

    def prepare(self) -> None:
        """A1's candidate order: the public head run on every token alone (SmolLM2's 49k tokens through 2 layers:
        5-30 s on 2 busy cores), so the first turn does not wait for it."""
        if self.key_kind in (None, "permutation"):
            context_free_tables(self.public)

    def read(self, heard: Heard) -> list[Readback]:
        prompt_attack = A1 if self.key_kind is None else A4 + A1
        if self.key_kind not in (None, "permutation"):
            keyed = KEYED_PROMPT.get(
                str(self.key_kind), f"a {self.key_kind} key: no live attack is implemented for it. Not run."
            )
            return [
                Readback("prompt", prompt_attack, None, note=keyed),
                Readback("output", B3, None, note=KEYED_OUTPUT),
            ]
        wire = tolerance_dtype(heard.wire_dtype)
        if wire is None:
            note = (
                f"not run: A1's tolerance covers float and int8 wires, not {heard.wire_dtype.name.lower()}; the audit "
                "measured float wires (docs/threat-model.md)"
            )
            return [Readback("prompt", prompt_attack, None, note=note), Readback("output", B3, None, note=note)]
        start = time.perf_counter()
        item = Intercept([], [], heard.uplink, heard.downlink)
        notes = []
        if self.key_kind == "permutation":
            estimate = sorted_matching(self.public, [item], wire_dtype=wire, max_candidates=self.max_candidates)
            item = decode_with(estimate, item)  # the traffic as if there were no key, if the key is right
            rows = estimate.details["rows"]
            notes.append(f"key fitted to {rows} rows in {estimate.seconds:.1f} s; {PERMUTATION_NOTE}")
        p = heard.prompt_length
        found = recover(self.public, item.uplink[:p], wire_dtype=wire, max_candidates=self.max_candidates)
        if found.misses:
            notes.append(f"{len(found.misses)} of {p} positions had no exact match (the closest candidate kept)")
        seconds = time.perf_counter() - start
        prompt = Readback("prompt", prompt_attack, found.ids, seconds, "; ".join(notes))
        return [prompt, self._output(item, p, found.ids, wire)]

    def _output(self, item: Intercept, prompt_length: int, prefix: list[int], wire: torch.dtype) -> Readback:
        if self.public.tail is None or item.downlink.shape[0] < prompt_length:
            return Readback("output", B3, None, note="not run: no public tail, or the downlink does not hold every row")
        # The attacker's own reading of the prompt is the prefix; nothing the device knows goes in.
        item = Intercept(prefix, [], item.uplink, item.downlink)
        [result] = sampled_tokens(
            self.public, [item], prompts=[prefix], wire_dtype=wire, max_candidates=self.max_candidates
        )
        misses = result.details["misses"]
        note = "the last token never goes back up, so it is the tail's most likely token, unconfirmed"
        if misses:
            note = f"{len(misses)} fed-back tokens had no exact match (the tail's choice kept); {note}"
        return Readback("output", B3, result.recovered, result.seconds, note)

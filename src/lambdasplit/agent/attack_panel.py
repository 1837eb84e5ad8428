"""What an attacker reads back, live: an attack run on the hidden states each conversation actually sent.

The product never imports the research suite (``lambdasplit.audit``, fenced off by the import contracts), so
the attack comes in from outside as an ``Attacker``: ``lambdasplit up`` passes ``audit.live.LiveAttacker``,
the audit's strongest attack for the deployment. This module is the plumbing around it:

    request      expect()   the truth, which only the device knows: prompt ids, the user's texts
    generation   capture()  ``CapturingLink`` keeps every row as it crossed the wire, both ways (decoded from
                            the frames exactly as sent, so after the wire dtype's rounding and any key)
    turn done    finish()   the attacker reads the capture on its own thread (off the event loop and the
                            generation pool; one at a time, a newer turn supersedes one still queued), the
                            panel scores what it recovered against the truth and publishes an ``attack``
                            event on the feed (``GET /v1/lambdasplit/attack`` serves the latest)

The attacker is given only what an observer of the link has (``Overheard``); the truth stays here, for
scoring. Shapes: ``T`` positions sent, ``D`` hidden size.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from lambdasplit.agent.feed import NetworkFeed, ObservedLink
from lambdasplit.generation import GenerationResult
from lambdasplit.generation.session import Traffic
from lambdasplit.wire import WireDtype, decode_frame, frame_tensor

#: Turns announced but never finished (the client hung up, the cloud failed) are forgotten past this many.
PENDING = 16


@dataclass(frozen=True)
class Overheard:
    """One conversation as an observer of the link has it: the frames' tensors, nothing the device kept."""

    uplink: torch.Tensor  # (T, D) float32: the state after layer X of every position, as sent
    downlink: torch.Tensor  # (T, D) float32: the state after layer Y-1 of the same positions, as returned
    prompt_length: int  # rows of the first frame (the prefill): the prompt's length, visible on the wire
    wire_dtype: WireDtype


class Readback(Protocol):
    """What an attacker recovered from one side of one conversation (``ids`` None: not run; ``note`` says why)."""

    @property
    def side(self) -> str: ...  # "prompt" (the uplink's prefill rows) or "output" (the generated tokens)

    @property
    def attack(self) -> str: ...  # a name for people: "A1 exact matching through the public head"

    @property
    def ids(self) -> list[int] | None: ...

    @property
    def seconds(self) -> float: ...

    @property
    def note(self) -> str: ...


class Attacker(Protocol):
    """Reads token ids back from what crossed the link. Both methods run on the panel's attack thread."""

    def prepare(self) -> None:
        """One-off work before the first conversation (tables over the vocabulary, ...)."""

    def read(self, heard: Overheard) -> Sequence[Readback]: ...


class CapturingLink:
    """A ``BodyLink`` that keeps every row of ``observed``'s frames, in position order (rollbacks honoured)."""

    def __init__(self, observed: ObservedLink) -> None:
        self.observed = observed
        self.up: list[torch.Tensor] = []  # one (D,) row per position
        self.down: list[torch.Tensor] = []
        self.prompt_length: int | None = None
        self.aligned = True  # False once a reply carried fewer rows than its request (STIP's last-row frames)

    @property
    def traffic(self) -> Traffic:
        return self.observed.traffic

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        out = self.observed.forward(hidden, position, reset, last)
        remote = self.observed.link
        limits = remote.client.limits
        sent = frame_tensor(decode_frame(remote.last_sent, limits), dtype=torch.float32)  # (rows, D)
        got = frame_tensor(decode_frame(remote.last_received, limits), dtype=torch.float32)
        if self.prompt_length is None:
            self.prompt_length = int(sent.shape[0])
        del self.up[position:], self.down[position:]
        self.up.extend(sent)
        if got.shape == sent.shape:
            self.down.extend(got)
        else:
            self.aligned = False
        return out

    def close(self) -> None:
        self.observed.close()

    def overheard(self, positions: int) -> Overheard | None:
        """The first ``positions`` rows (what the body kept: rows past them held drafts the device rejected at the
        last step, which no later frame overwrote)."""
        if not self.up or self.prompt_length is None:
            return None
        up = torch.stack(self.up[:positions])
        down = torch.stack(self.down[:positions]) if self.aligned and len(self.down) == len(self.up) else up[:0]
        return Overheard(up, down, self.prompt_length, self.observed.link.wire_dtype)


@dataclass
class _Turn:
    """One request's truth and capture."""

    prompt_ids: list[int]
    texts: list[str]  # the conversation's own texts (messages' contents, or the completion prompt)
    link: CapturingLink | None = None
    output_ids: list[int] = field(default_factory=list)


class AttackPanel:
    """Runs ``attacker`` on each finished turn and publishes what it read back on ``feed``."""

    def __init__(
        self,
        attacker: Attacker,
        feed: NetworkFeed,
        tokenizer: PreTrainedTokenizerBase,
        *,
        cloud_url: str,
        keyed: bool = False,
    ) -> None:
        self.attacker, self.feed, self.tokenizer = attacker, feed, tokenizer
        self.tls = all(u.strip().startswith("wss://") for u in cloud_url.split(","))
        self.keyed = keyed
        self.latest: dict[str, Any] | None = None
        self._pending: OrderedDict[str, _Turn] = OrderedDict()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._newest = 0
        self._prepared = self._closed = False
        # One daemon thread: an attack still running when the agent stops must not hold its exit up.
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._work, name="lambdasplit-attack", daemon=True).start()
        self._jobs.put(self._prepare)  # the vocabulary tables, before the first turn needs them

    # --- the request's life ------------------------------------------------------------------------------
    def expect(self, request: str, prompt_ids: list[int], prompt_view: Any) -> None:
        """Note the truth of ``request`` (``prompt_view``: the messages, or the completion prompt)."""
        texts = [prompt_view] if isinstance(prompt_view, str) else [str(m.get("content") or "") for m in prompt_view]
        with self._lock:
            self._pending[request] = _Turn(list(prompt_ids), [t for t in texts if t.strip()])
            while len(self._pending) > PENDING:
                self._pending.popitem(last=False)

    def capture(self, request: str, link: ObservedLink) -> CapturingLink | ObservedLink:
        """``link``, recorded for ``request`` (unchanged when the request was not ``expect``ed)."""
        with self._lock:
            turn = self._pending.get(request)
            if turn is None:
                return link
            turn.link = CapturingLink(link)
            return turn.link

    def finish(self, request: str, result: GenerationResult | None) -> None:
        """The turn is over (``result`` None: it was cancelled, nothing is attacked); queue the attack."""
        with self._lock:
            turn = self._pending.pop(request, None)
        if turn is None or turn.link is None or result is None:
            return
        # Fed positions: the prompt and every new token (the last one too when an EOS followed it), no more.
        heard = turn.link.overheard(len(turn.prompt_ids) + len(result.token_ids))
        if heard is None:
            return
        turn.output_ids = list(result.token_ids)
        with self._lock:
            seq = self._newest = next(self._seq)
        self._publish({"type": "attack", "request": request, "status": "running"} | self.threat())
        self._jobs.put(lambda: self._attack(seq, request, turn, heard))

    def close(self) -> None:
        """Stop after the job in hand; queued ones are dropped."""
        self._closed = True
        self._jobs.put(None)

    # --- on the attack thread ------------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None and not self._closed:
            # Only the warm-up can raise here (an attack reports its own failure): the next attack retries it.
            with contextlib.suppress(Exception):
                job()

    def _prepare(self) -> None:
        if not self._prepared:
            self.attacker.prepare()
            self._prepared = True

    def _attack(self, seq: int, request: str, turn: _Turn, heard: Overheard) -> None:
        event: dict[str, Any] = {"type": "attack", "request": request} | self.threat()
        if seq < self._newest:  # a newer turn is queued: it is the one the panel will show
            self._publish(event | {"status": "superseded"})
            return
        start = time.perf_counter()
        try:
            self._prepare()
            readbacks = self.attacker.read(heard)
            event |= {"status": "done", "results": [self._score(r, turn) for r in readbacks]}
        except Exception as exc:  # shown in the panel; the agent goes on serving
            event |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        event["seconds"] = round(time.perf_counter() - start, 2)
        self._publish(event)

    def _publish(self, event: dict[str, Any]) -> None:
        if event.get("status") != "superseded":
            self.latest = event
        self.feed.publish(event)

    # --- scoring, with the truth only the device has ---------------------------------------------------------
    def _score(self, readback: Readback, turn: _Turn) -> dict[str, Any]:
        out: dict[str, Any] = {
            "side": readback.side,
            "attack": readback.attack,
            "seconds": round(readback.seconds, 2),
            "note": readback.note,
        }
        if readback.ids is None:
            return out
        ids = list(readback.ids)
        truth = turn.prompt_ids if readback.side == "prompt" else turn.output_ids
        ok = [i >= len(truth) or r == truth[i] for i, r in enumerate(ids)]
        correct = sum(r == t for r, t in zip(ids, truth, strict=False))
        out |= {
            "text": self._decode(ids),
            "pieces": self._pieces(ids, ok),
            "tokens": len(truth),
            "correct": correct,
            "token_accuracy": correct / len(truth) if truth else None,
        }
        if readback.side == "prompt":
            found = {(s.start, s.stop) for s in (_find(truth, self._ids(t)) for t in turn.texts) if s is not None}
            spans = [slice(a, b) for a, b in sorted(found)]
            total = sum(s.stop - s.start for s in spans)
            right = sum(sum(a == b for a, b in zip(ids[s], truth[s], strict=False)) for s in spans)
            out |= {"user_tokens": total, "user_correct": right, "user_accuracy": right / total if total else None}
        return out

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _pieces(self, ids: list[int], ok: list[bool]) -> list[tuple[str, bool]]:
        """The recovered text in runs of right and wrong tokens (decoded per run, so characters stay whole)."""
        runs: list[tuple[str, bool]] = []
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ok[i] != ok[start]:
                runs.append((self._decode(ids[start:i]), ok[start]))
                start = i
        return runs

    def threat(self) -> dict[str, Any]:
        """Who can run this attack on this deployment, for the panel's words."""
        if self.tls:
            eavesdropper = (
                "this link is TLS (wss://): an eavesdropper sees TLS records, so sizes and timing, not these "
                "states. TLS removes this attacker."
            )
        else:
            eavesdropper = (
                "this link is plain ws://: anyone on the path reads every frame and can run this attack. "
                "TLS (wss://) removes this attacker."
            )
        cloud = (
            "receives these states to run the body, so it can always run this attack. TLS does not help against it"
            + (": a key only changes which attack it runs first." if self.keyed else ".")
        )
        return {
            "tls": self.tls,
            "keyed": self.keyed,
            "attackers": [
                {"who": "eavesdropper with the public weights", "sees": not self.tls, "text": eavesdropper},
                {"who": "curious cloud (the body server)", "sees": True, "text": cloud},
            ],
        }

    def report(self) -> dict[str, Any]:
        """The latest attack event (or just the threat when no turn was attacked yet)."""
        return self.latest or ({"type": "attack", "status": "idle"} | self.threat())


def _find(haystack: Sequence[int], needle: Sequence[int]) -> slice | None:
    """Where ``needle`` first occurs in ``haystack`` as a contiguous run (None if nowhere, or empty)."""
    n = len(needle)
    for i in range(len(haystack) - n + 1 if n else 0):
        if list(haystack[i : i + n]) == list(needle):
            return slice(i, i + n)
    return None

"""What an attacker intercepts: every hidden state that crossed the link during one conversation.

``intercept`` runs a real split generation (the same ``SplitDecoder`` as ``generate``) through a link
that records what went up and what came down, after any ``wire_transform`` the split applies: exactly
the tensors a wire frame carries. The ground truth (prompt and output ids) is kept beside it for
scoring only; attacks must not read it.

Shapes: ``D`` hidden size. Positions are in sequence order: the prompt's, then one per fed token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lambdasplit.generation.api import prompt_ids as encode_ids
from lambdasplit.generation.api import stream
from lambdasplit.generation.session import BodyLink, LocalBodyLink, Traffic
from lambdasplit.split.loader import SplitModel
from lambdasplit.wire.tensors import WireDtype, decode_tensor, encode_tensor


@dataclass
class Intercept:
    """One conversation as seen on the link, with its ground truth.

    ``uplink[i]`` is the state after layer X of position ``i`` as sent (float32, (P + G - 1, D) for a
    P-token prompt and G generated tokens: the last generated token is never fed back).
    ``downlink[i]`` is the state after layer Y-1 of the same position as returned.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    uplink: torch.Tensor
    downlink: torch.Tensor

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def fed_ids(self) -> list[int]:
        """The token at each intercepted position: the prompt, then every generated token but the last."""
        return (self.prompt_ids + self.output_ids)[: self.uplink.shape[0]]


class RecordingLink:
    """A ``BodyLink`` that keeps a copy of every tensor it carries, in position order (rollbacks honoured).

    With a ``wire_dtype`` other than float32, both directions go through the wire codec first, as over a
    network: in-process generation would otherwise hand the attacks float32 states, while a deployment
    sends float16 (the CLI's default) or int8.
    """

    def __init__(self, inner: BodyLink, wire_dtype: WireDtype | str = WireDtype.FLOAT32) -> None:
        self.inner, self.wire_dtype = inner, WireDtype.parse(wire_dtype)
        self.up: list[torch.Tensor] = []  # one (D,) row per position
        self.down: list[torch.Tensor] = []

    @property
    def traffic(self) -> Traffic:
        return self.inner.traffic

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        if self.wire_dtype is WireDtype.FLOAT32:
            return t
        payload, shape = encode_tensor(t, self.wire_dtype)
        return decode_tensor(payload, self.wire_dtype, shape, dtype=t.dtype, device=t.device)

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        """(With ``last``, the downlink records the one row that crossed.)"""
        hidden = self._wire(hidden)
        out = self._wire(self.inner.forward(hidden, position, reset, last))
        del self.up[position:], self.down[position:]
        self.up.extend(hidden[0].detach().float().cpu())
        self.down.extend(out[0].detach().float().cpu())
        return out

    def close(self) -> None:
        self.inner.close()


def intercept(
    split: SplitModel,
    prompt: str | Sequence[int],
    *,
    chat: bool = False,
    link: BodyLink | None = None,
    wire_dtype: WireDtype | str = "float32",
    max_new_tokens: int = 32,
    **sampling: Any,
) -> Intercept:
    """Generate from ``prompt`` on ``split`` (greedy unless ``sampling`` says otherwise) and record the link.

    Without ``link`` the body runs here; either way the tensors pass the wire codec for ``wire_dtype`` (what a
    frame carries; give float32 with a network link, which already went through its own).
    """
    if link is None:
        assert split.body is not None, "pass a link when the split holds no body"
        link = LocalBodyLink(split.body)
    recorder = RecordingLink(link, wire_dtype)
    ids = encode_ids(split, prompt, chat=chat)
    result = stream(
        split,
        ids,
        link=recorder,
        max_new_tokens=max_new_tokens,
        **sampling,
    ).run()
    empty = torch.empty(0, split.hidden_size)
    return Intercept(
        prompt_ids=ids,
        output_ids=list(result.token_ids),
        uplink=torch.stack(recorder.up) if recorder.up else empty,
        downlink=torch.stack(recorder.down) if recorder.down else empty,
    )

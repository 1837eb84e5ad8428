"""Hide the prompt's length from an eavesdropper: multi-position FORWARDs padded to a multiple of ``multiple``.

With caching every decode frame has the same size, so under TLS an eavesdropper learns little from sizes
except one thing: the prefill frame carries one row per prompt token, so its size gives the prompt's length
(and a new chat turn's). ``PaddedLink`` wraps any ``BodyLink`` and sends every FORWARD of more than one
position as ``ceil(T / multiple) * multiple`` rows: the real rows, then copies of the last one.

Exact by causality: the body's layers attend only to earlier positions, so the real rows' outputs do not
depend on the padding that follows them; the padding's outputs are dropped. The padding's positions do enter
the body's KV cache, and the next FORWARD, at the real length, rolls them back (a position below the cache's
length is a rollback in the protocol, docs/protocol.md), so they cost compute and bytes but change nothing.

What it does not hide: the cloud sees the real length (from the next FORWARD's position), and the number of
decode steps still tells how many tokens were generated. Padding costs what the extra rows cost: measured in
docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from lambdasplit.errors import ConfigError
from lambdasplit.generation.session import BodyLink
from lambdasplit.traffic import Traffic


class PaddedLink:
    """A ``BodyLink`` that pads multi-position FORWARDs of ``link`` to a multiple of ``multiple`` rows."""

    def __init__(self, link: BodyLink, multiple: int) -> None:
        if multiple < 2:
            raise ConfigError(f"pad multiple {multiple} is invalid: at least 2 rows (1 would pad nothing)")
        self.link, self.multiple = link, multiple
        self.padded_rows = 0  # rows sent only to hide a length

    @property
    def traffic(self) -> Traffic:
        return self.link.traffic

    def forward(self, hidden: torch.Tensor, position: int, reset: bool = False, last: bool = False) -> torch.Tensor:
        """(1, T, D) at ``position`` -> (1, T, D); sent as (1, T + pad, D) when T > 1.

        ``last`` (STIP's layout: a prompt's logits) is not passed on for a padded prompt, whose last row is
        padding: every row comes back and the prompt's last is kept, so the downlink is padded too."""
        rows = hidden.shape[1]
        pad = -rows % self.multiple if rows > 1 else 0
        if not pad:
            return self.link.forward(hidden, position, reset, last)
        hidden = torch.cat([hidden, hidden[:, -1:].expand(-1, pad, -1)], dim=1)
        self.padded_rows += pad
        out = self.link.forward(hidden, position, reset)[:, :rows]
        return out[:, -1:] if last else out

    def close(self) -> None:
        self.link.close()

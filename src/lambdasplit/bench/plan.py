"""Λ-Split's preparation phase: predict each candidate split's speed, memory and traffic, and pick one.

The paper chooses the split before deployment from the device's and the server's per-layer cost, the
link, and the device's memory. This module is the arithmetic, pure and deterministic: measured inputs in
(``Costs``, ``LinkSpec``, wire bytes, memory, audited recovery), candidates and a recommendation out.
``profile.py`` measures the inputs; ``lambdasplit plan`` prints the table.

The cost of one cached decode step (one new token; one round trip), for X head layers, T tail layers and
B = N - X - T body layers:

    device  = d_ends + 2 d_fwd + (X + T) d_layer          embedding, final norm, LM head, sampling; the head's
                                                          and the tail's own forward (masks, rotary); layers
    server  = s_fwd + B s_layer                           (0 for an empty body)
    link    = RTT + wire_up / bw_up + wire_down / bw_down + overhead
    step    = device + server + link

``overhead`` is what the cost of the parts does not hold: framing, sockets, the server's event loop and
scheduler, the session's bookkeeping. It is measured once over loopback (``profile.measure_overhead``).
``wire_*`` are IP-level bytes (the frame, its WebSocket header, and 66 bytes of TCP/IP/Ethernet header per
segment), since an emulated link paces Ethernet frames.

The prompt (P tokens) goes in one round trip with the same terms measured at P tokens (``*_prefill``), and
P hidden states each way. TCP starts a connection that sat idle with a window of 10 segments that doubles
every round trip, so a prefill of more than ~14 KB costs extra round trips: ``slow_start_rounds``.

    tokens/s = n / (prefill + (n - 1) step)               n new tokens; the first comes from the prefill
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lambdasplit.errors import ConfigError

MSS = 1448  # TCP payload per segment on a 1500-byte MTU with timestamps
SEGMENT_HEADERS = 66  # 14 Ethernet + 20 IP + 32 TCP (timestamps) bytes per segment
INITIAL_WINDOW = 10  # segments (RFC 6928; Linux restarts from it after an idle period)

#: The candidate grid, the audit's own (docs/audit/smollm2.json), so every cell has recorded recovery.
DEFAULT_HEADS = (0, 1, 2, 4, 8)
DEFAULT_TAILS = (1, 2, 4)


@dataclass(frozen=True)
class SideCosts:
    """One side's compute, in milliseconds: per decoder layer and per forward call, at decode (1 token) and at
    prefill (P tokens); ``ends``: embedding + final norm + LM head + sampling (device only)."""

    layer_ms: float
    forward_ms: float
    layer_prefill_ms: float
    forward_prefill_ms: float
    ends_ms: float = 0.0
    ends_prefill_ms: float = 0.0
    source: str = "given"

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "source" and not value >= 0:
                raise ConfigError(f"{name} must be >= 0 ms, got {value}")


@dataclass(frozen=True)
class Costs:
    device: SideCosts
    server: SideCosts
    #: Per round trip, beyond compute and the link (measured on loopback with an empty body).
    overhead_ms: float = 0.0
    overhead_source: str = "given"


@dataclass(frozen=True)
class LinkSpec:
    """Round trip in ms; rates in Mbit/s (None: not a limit, as loopback)."""

    name: str
    rtt_ms: float
    up_mbit: float | None
    down_mbit: float | None

    def __post_init__(self) -> None:
        if not self.rtt_ms >= 0:
            raise ConfigError(f"rtt must be >= 0 ms, got {self.rtt_ms}")
        for rate in (self.up_mbit, self.down_mbit):
            if rate is not None and not rate > 0:
                raise ConfigError(f"bandwidth must be > 0 Mbit/s, got {rate}")


@dataclass(frozen=True)
class Workload:
    """What the user runs: a prompt of ``prompt_tokens``, ``new_tokens`` generated."""

    prompt_tokens: int
    new_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 1:
            raise ConfigError(f"prompt and new tokens must be >= 1, got {self.prompt_tokens} and {self.new_tokens}")


@dataclass(frozen=True)
class Recovery:
    """The audit's strongest attack at one split, as a fraction of tokens recovered (None: not audited)."""

    prompt: float | None = None
    prompt_attack: str = ""
    output: float | None = None
    output_attack: str = ""


@dataclass(frozen=True)
class Candidate:
    head_layers: int
    tail_layers: int
    body_layers: int
    step_ms: float
    prefill_ms: float
    tokens_per_second: float
    device_ms: float  # per decode step
    server_ms: float
    link_ms: float
    device_memory_bytes: int
    up_bytes_per_token: int  # at the socket: frame + WebSocket header
    down_bytes_per_token: int
    recovery: Recovery = field(default_factory=Recovery)

    @property
    def device_layers(self) -> int:
        return self.head_layers + self.tail_layers

    @property
    def layers(self) -> str:
        """The split as ``--layers X:Y`` spells it."""
        return f"{self.head_layers}:{self.head_layers + self.body_layers}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"layers": self.layers, "device_layers": self.device_layers}


def slow_start_rounds(nbytes: int) -> int:
    """Round trips TCP needs to send ``nbytes`` from an initial window of 10 segments, doubling each round."""
    segments = math.ceil(nbytes / MSS)
    return max(1, math.ceil(math.log2(segments / INITIAL_WINDOW + 1)))


def wire_bytes(socket_bytes: int) -> int:
    """IP-level bytes on the link for ``socket_bytes`` of TCP payload (headers of every segment added)."""
    return socket_bytes + math.ceil(socket_bytes / MSS) * SEGMENT_HEADERS


def _transfer_ms(nbytes: int, mbit: float | None) -> float:
    return 0.0 if mbit is None else wire_bytes(nbytes) * 8 / (mbit * 1e3)


def predict(
    costs: Costs,
    link: LinkSpec,
    workload: Workload,
    *,
    num_layers: int,
    head_layers: int,
    tail_layers: int,
    up_bytes: int,
    down_bytes: int,
    prefill_up_bytes: int,
    prefill_down_bytes: int,
    device_memory_bytes: int,
    recovery: Recovery | None = None,
) -> Candidate:
    """The predicted figures of one split (the module docstring's equations). Bytes are socket bytes per message:
    one decode step's up and down, and the prompt's."""
    x, t = head_layers, tail_layers
    body = num_layers - x - t
    if x < 0 or t < 0 or body < 0:
        raise ConfigError(f"head {x} + tail {t} layers do not fit a model of {num_layers} layers")
    d, s = costs.device, costs.server
    device = d.ends_ms + 2 * d.forward_ms + (x + t) * d.layer_ms
    server = s.forward_ms + body * s.layer_ms if body else 0.0
    link_ms = (
        link.rtt_ms
        + _transfer_ms(up_bytes, link.up_mbit)
        + _transfer_ms(down_bytes, link.down_mbit)
        + costs.overhead_ms
    )
    step = device + server + link_ms
    # Each direction of the prompt takes as many round trips as slow start needs (the first is the RTT itself).
    extra_rounds = slow_start_rounds(prefill_up_bytes) - 1 + slow_start_rounds(prefill_down_bytes) - 1
    prefill = (
        d.ends_prefill_ms
        + 2 * d.forward_prefill_ms
        + (x + t) * d.layer_prefill_ms
        + ((s.forward_prefill_ms + body * s.layer_prefill_ms) if body else 0.0)
        + link.rtt_ms * (1 + extra_rounds)
        + _transfer_ms(prefill_up_bytes, link.up_mbit)
        + _transfer_ms(prefill_down_bytes, link.down_mbit)
        + costs.overhead_ms
    )
    n = workload.new_tokens
    total_ms = prefill + (n - 1) * step
    return Candidate(
        head_layers=x,
        tail_layers=t,
        body_layers=body,
        step_ms=step,
        prefill_ms=prefill,
        tokens_per_second=n / (total_ms / 1e3),
        device_ms=device,
        server_ms=server,
        link_ms=link_ms,
        device_memory_bytes=device_memory_bytes,
        up_bytes_per_token=up_bytes,
        down_bytes_per_token=down_bytes,
        recovery=recovery or Recovery(),
    )


def candidates(
    costs: Costs,
    link: LinkSpec,
    workload: Workload,
    *,
    num_layers: int,
    splits: Iterable[tuple[int, int]],
    step_bytes: tuple[int, int],
    prefill_bytes: tuple[int, int],
    memory: Callable[[int, int], int],
    recovery: Callable[[int, int], Recovery],
) -> list[Candidate]:
    """``predict`` for every (head, tail) split; ``memory`` and ``recovery`` are looked up per split."""
    return [
        predict(
            costs,
            link,
            workload,
            num_layers=num_layers,
            head_layers=x,
            tail_layers=t,
            up_bytes=step_bytes[0],
            down_bytes=step_bytes[1],
            prefill_up_bytes=prefill_bytes[0],
            prefill_down_bytes=prefill_bytes[1],
            device_memory_bytes=memory(x, t),
            recovery=recovery(x, t),
        )
        for x, t in splits
    ]


def grid(
    num_layers: int, heads: Iterable[int] = DEFAULT_HEADS, tails: Iterable[int] = DEFAULT_TAILS
) -> list[tuple[int, int]]:
    """(head, tail) pairs that leave the cloud at least one layer."""
    return sorted({(x, t) for x in heads for t in tails if x >= 0 and t >= 0 and x + t < num_layers})


@dataclass(frozen=True)
class Constraints:
    min_tokens_per_second: float | None = None
    max_device_memory_bytes: int | None = None


#: Candidates within this fraction of the fastest count as equally fast.
TIE = 0.05


def _recovery_key(c: Candidate) -> tuple[int, int]:
    # In steps of 5 points: the audit's prompts hold a few hundred tokens, so one token more or less recovered
    # (99.7% against 100%) is no evidence that one split protects better. Not audited ranks as full recovery.
    r = c.recovery
    return (round(20 * (1.0 if r.prompt is None else r.prompt)), round(20 * (1.0 if r.output is None else r.output)))


def recommend(candidates: Sequence[Candidate], constraints: Constraints) -> Candidate:
    """The candidate to deploy: among those meeting ``constraints``, the lowest audited recovery (prompt, then
    generated tokens); among those, the ones within 5% of the fastest; among those, the most device layers
    (then the most head layers). Raises ``ConfigError`` naming the constraint that binds when none fits."""
    if not candidates:
        raise ConfigError("no candidate splits to choose from")
    fast, small = constraints.min_tokens_per_second, constraints.max_device_memory_bytes
    meets_speed = [c for c in candidates if fast is None or c.tokens_per_second >= fast]
    meets_memory = [c for c in candidates if small is None or c.device_memory_bytes <= small]
    feasible = [c for c in meets_speed if c in meets_memory]
    if not feasible:
        best_speed = max(c.tokens_per_second for c in candidates)
        least_memory = min(c.device_memory_bytes for c in candidates)
        if not meets_speed:
            raise ConfigError(
                f"no split reaches --min-tokens-per-second {fast:g}: the fastest candidate is predicted at "
                f"{best_speed:.1f} tokens/s on this link"
            )
        if not meets_memory:
            raise ConfigError(
                f"no split fits --max-device-memory {_mb(small)}: the smallest candidate needs {_mb(least_memory)}"
            )
        fast_memory = min(c.device_memory_bytes for c in meets_speed)
        raise ConfigError(
            f"the two constraints exclude each other: splits reaching {fast:g} tokens/s need at least "
            f"{_mb(fast_memory)} on the device (--max-device-memory {_mb(small)}), and those that fit reach at most "
            f"{max(c.tokens_per_second for c in meets_memory):.1f} tokens/s"
        )
    safest = min(_recovery_key(c) for c in feasible)
    pool = [c for c in feasible if _recovery_key(c) == safest]
    top = max(c.tokens_per_second for c in pool)
    ties = [c for c in pool if c.tokens_per_second >= (1 - TIE) * top]
    return max(ties, key=lambda c: (c.device_layers, c.head_layers, c.tokens_per_second))


def _mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f} MB"


def parse_size(text: str) -> int:
    """``512MB``, ``1.5GB``, ``300MiB`` or plain bytes -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise ConfigError(f"memory size {text!r} is not understood: use e.g. 500MB, 1.5GB or 300MiB")
    return int(value * units[unit])


def recommendation_text(choice: Candidate, candidates: Sequence[Candidate]) -> list[str]:
    """What to tell the user about the choice, quoting the audit's figures and claiming nothing beyond them."""
    r = choice.recovery
    lines = [
        f"Recommended: --layers {choice.layers} ({choice.head_layers} head, {choice.body_layers} body, "
        f"{choice.tail_layers} tail layers): {choice.tokens_per_second:.1f} tokens/s predicted, "
        f"{_mb(choice.device_memory_bytes)} on the device, {choice.up_bytes_per_token} B up and "
        f"{choice.down_bytes_per_token} B down per token."
    ]
    if r.prompt is None and r.output is None:
        lines.append(
            "This model has no recorded audit: how much of the prompt and the answer a server can recover from "
            "the hidden states is not known. Run `lambdasplit audit` before relying on any split."
        )
        return lines
    audited = [c.recovery for c in candidates if c.recovery.prompt is not None]
    low = min((x.prompt for x in audited if x.prompt is not None), default=None)
    lines.append(
        f"Privacy, as audited (no defence): the strongest attack recovers {_pct(r.prompt)} of the prompt's tokens "
        f"({r.prompt_attack or 'not audited'}) and {_pct(r.output)} of the generated tokens "
        f"({r.output_attack or 'not audited'}) at this split."
    )
    if low is not None and low >= 0.99:
        lines.append(
            "No split in this table hides the text from the server: more device layers do not stop recovery. "
            "The split is a speed and memory choice; for privacy use a defence (docs/threat-model.md) and audit it "
            "with `lambdasplit audit`."
        )
    return lines


def _pct(value: float | None) -> str:
    return "not audited" if value is None else f"{value:.0%}"

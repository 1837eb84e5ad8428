"""``lambdasplit plan`` without its printing: measure (or take) the inputs, predict every candidate, recommend one.

The arithmetic is plan.py's; the measurements profile.py's; recorded recovery recovery.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer

from lambdasplit.bench.links import Link
from lambdasplit.bench.plan import (
    DEFAULT_HEADS,
    DEFAULT_TAILS,
    Candidate,
    Constraints,
    Costs,
    LinkSpec,
    SideCosts,
    Workload,
    candidates,
    grid,
    recommend,
    recommendation_text,
)
from lambdasplit.bench.profile import (
    device_parameter_bytes,
    frame_bytes,
    kv_cache_bytes,
    measure_costs,
    measure_overhead,
)
from lambdasplit.bench.recovery import recovery_for
from lambdasplit.config import parse_dtype
from lambdasplit.errors import ConfigError
from lambdasplit.generation.text import encode_prompt
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.wire import WireDtype

#: The paper's Table I prompt, as ``bench llm`` sends it (a chat message).
PAPER_PROMPT = "What is the difference between AI, ML and DL?"

#: Milliseconds per round trip that compute does not explain (framing, sockets, the server's event loop and
#: scheduler): the device's wait on the link minus the server's own compute. docs/benchmarks.md's Table I on loopback
#: (this project's 2-CPU machine, quiet) has it as Comm. s: 0.76-0.79 s over 300 tokens, 2.5-2.6 ms per step.
#: Another machine has its own: ``--measure-overhead`` measures it there.
DEFAULT_OVERHEAD_MS = 2.6


@dataclass(frozen=True)
class PlanConfig:
    model: str = DEFAULT_MODEL
    link: LinkSpec = field(default_factory=lambda: LinkSpec("loopback", 0.0, None, None))
    prompt_tokens: int | None = None  # None: the paper's prompt, counted by this model's chat template
    new_tokens: int = 128
    wire_dtype: str = "float16"
    dtype: str = "float32"  # the device's weights and KV cache
    heads: tuple[int, ...] = DEFAULT_HEADS
    tails: tuple[int, ...] = DEFAULT_TAILS
    device_threads: int | None = None
    server_threads: int | None = None
    device_layer_ms: float | None = None  # given: the device's measured costs scaled to it
    server_layer_ms: float | None = None
    overhead_ms: float | None = None  # None: DEFAULT_OVERHEAD_MS, or measured with measure_overhead
    measure_overhead: bool = False
    repeats: int = 16
    constraints: Constraints = field(default_factory=Constraints)

    def __post_init__(self) -> None:
        # Checked before seconds of measuring: a typo should cost nothing.
        if not WireDtype.parse(self.wire_dtype).is_tensor:
            raise ConfigError(f"wire dtype {self.wire_dtype!r} carries no hidden state; use e.g. float16")
        parse_dtype(self.dtype, torch.device("cpu"))
        if self.new_tokens < 1 or (self.prompt_tokens is not None and self.prompt_tokens < 1):
            raise ConfigError("new and prompt tokens must be >= 1")


@dataclass
class PlanResult:
    config: PlanConfig
    num_layers: int
    hidden_size: int
    workload: Workload
    costs: Costs
    candidates: list[Candidate]
    choice: Candidate | None
    advice: list[str]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "workload": dataclasses.asdict(self.workload),
            "costs": dataclasses.asdict(self.costs),
            "candidates": [c.to_dict() for c in self.candidates],
            "recommended": None if self.choice is None else self.choice.layers,
            "advice": self.advice,
            "error": self.error,
        }


def link_spec(link: Link) -> LinkSpec:
    return LinkSpec(link.name, link.rtt_ms, link.up_mbit, link.down_mbit)


def _scaled(side: SideCosts, layer_ms: float | None, who: str) -> SideCosts:
    """``side`` scaled so its per-layer decode cost is ``layer_ms``: the whole side k times slower or faster."""
    if layer_ms is None:
        return side
    if not layer_ms > 0:
        raise ConfigError(f"--{who}-layer-ms must be > 0, got {layer_ms}")
    k = layer_ms / side.layer_ms
    return SideCosts(
        layer_ms=layer_ms,
        forward_ms=side.forward_ms * k,
        layer_prefill_ms=side.layer_prefill_ms * k,
        forward_prefill_ms=side.forward_prefill_ms * k,
        ends_ms=side.ends_ms * k,
        ends_prefill_ms=side.ends_prefill_ms * k,
        source=f"given ({layer_ms:g} ms per layer; the rest scaled by {k:.2f} from what was {side.source})",
    )


def run_plan(config: PlanConfig) -> PlanResult:
    """Measure, predict and recommend. A constraint no candidate meets leaves ``choice`` None and says why."""
    path = resolve_checkpoint(config.model, quiet=True)
    model_config = Checkpoint(path).config
    n, hidden = int(model_config.num_hidden_layers), int(model_config.hidden_size)
    splits = grid(n, config.heads, config.tails)
    if not splits:
        raise ConfigError(
            f"no split of head {config.heads} and tail {config.tails} layers leaves the cloud a layer of {n}"
        )
    prompt_tokens = config.prompt_tokens
    if prompt_tokens is None:
        prompt_tokens = len(encode_prompt(AutoTokenizer.from_pretrained(path), PAPER_PROMPT, chat=True))
    workload = Workload(prompt_tokens, config.new_tokens)

    measured = measure_costs(
        path,
        workload,
        device_threads=config.device_threads,
        server_threads=config.server_threads,
        repeats=config.repeats,
        server=config.server_layer_ms is None,  # given: the device's profile is scaled to it
    )
    costs = Costs(
        _scaled(measured.device, config.device_layer_ms, "device"),
        _scaled(measured.server, config.server_layer_ms, "server"),
    )
    if config.overhead_ms is not None:
        costs = dataclasses.replace(costs, overhead_ms=config.overhead_ms, overhead_source="given")
    elif config.measure_overhead:
        ms = measure_overhead(
            config.model,
            workload,
            wire_dtype=config.wire_dtype,
            device_threads=config.device_threads,
            server_threads=config.server_threads,
        )
        costs = dataclasses.replace(costs, overhead_ms=ms, overhead_source="measured here on loopback")
    else:
        costs = dataclasses.replace(
            costs,
            overhead_ms=DEFAULT_OVERHEAD_MS,
            overhead_source="default: Table I's loopback figure on the project's 2-CPU machine",
        )

    context = prompt_tokens + config.new_tokens

    def memory(x: int, t: int) -> int:
        return device_parameter_bytes(path, x, n - t, config.dtype) + kv_cache_bytes(
            model_config, x + t, context, config.dtype
        )

    found = candidates(
        costs,
        config.link,
        workload,
        num_layers=n,
        splits=splits,
        step_bytes=frame_bytes(hidden, config.wire_dtype),
        prefill_bytes=frame_bytes(hidden, config.wire_dtype, prompt_tokens),
        memory=memory,
        recovery=lambda x, t: recovery_for(config.model, x, t),
    )
    try:
        choice: Candidate | None = recommend(found, config.constraints)
    except ConfigError as exc:
        return PlanResult(config, n, hidden, workload, costs, found, None, [], error=str(exc))
    assert choice is not None
    return PlanResult(config, n, hidden, workload, costs, found, choice, recommendation_text(choice, found))

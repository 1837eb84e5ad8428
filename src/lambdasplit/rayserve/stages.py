"""A body server whose body is a chain of stage actors on other machines (issue 24: "a body across machines").

``staged_server`` is what a Ray Serve replica calls, inside a Ray worker connected to the cluster: it places the
stages (``chain.StageChain``), then returns an ordinary ``BodyServer`` over the unchanged protocol whose sessions
drive the chain. The replica holds no body weights (it reads the checkpoint's config and fingerprint only); a
device cannot tell the difference except from WELCOME, which adds ``"stages": [[a, b], ...]``.

Within the cluster, hidden states travel between stages as Ray objects (pickled torch tensors, in Ray's object
store); the device-facing wire format (no pickle) is unchanged, and only the replica speaks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lambdasplit.config import Runtime, SplitPoints
from lambdasplit.errors import ConfigError, ModelLoadError
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.rayserve.chain import ChainBody, ChainState, StageChain
from lambdasplit.server.app import BodyServer
from lambdasplit.server.settings import ServerSettings
from lambdasplit.split.loader import DEFAULT_LAYERS, SplitModel
from lambdasplit.split.parts import Body
from lambdasplit.split.state import BodyState

__all__ = ["StagedBodyServer", "staged_server", "staged_split"]


class StagedBodyServer(BodyServer):
    """A ``BodyServer`` whose sessions run on a ``StageChain``: each session's state is a ``ChainState``."""

    def __init__(self, split: SplitModel, settings: ServerSettings) -> None:
        if not isinstance(split.body, ChainBody):
            raise ConfigError("a staged body server needs the SplitModel of staged_split (its body is a ChainBody)")
        super().__init__(split, settings)
        self.chain = split.body.chain
        self.trees = self.chain.trees  # the caches are on the stages: token trees where each can keep a branch

    def new_state(self, body: Body) -> ChainState:
        assert isinstance(body, ChainBody)  # checked in __init__, and a staged server has no user groups
        return ChainState(body)

    def release_state(self, state: BodyState) -> None:
        # The session's caches live on the stages: tell them (a stage runs one call at a time, so a step of the
        # session already submitted finishes first).
        state.close()

    def welcome(self) -> dict[str, Any]:
        return {**super().welcome(), "stages": [list(r) for r in self.chain.ranges]}

    def metrics_body(self) -> dict[str, Any]:
        return {**super().metrics_body(), "stages": self.chain.describe()}  # nodes: behind the token, like metrics

    def _warm_up(self) -> None:
        # A throw-away step through every stage: each loads its kernels, and a dead stage shows before any client.
        self.body(torch.zeros(1, 4, self.split.hidden_size, dtype=self.split.runtime.dtype))


def staged_split(
    model: str,
    layers: str | tuple[int, int] | None,
    stages: int | Sequence[int],
    *,
    device: str | None = None,
    dtype: str | None = None,
    spread: bool = True,
    idle_ttl: float = 600.0,
    timeout: float = 300.0,
) -> SplitModel:
    """The body ``layers`` of ``model`` placed as stage actors (``StageChain``), as a ``SplitModel`` whose body is a
    ``ChainBody``: what this process holds is the config, the fingerprint and handles to the stages.

    The fingerprint is this process's reading of the checkpoint, and every stage must report the same one.
    """
    checkpoint = Checkpoint(resolve_checkpoint(model, quiet=True))
    num_layers = getattr(checkpoint.config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ModelLoadError(f"{checkpoint.path}: config has no integer num_hidden_layers; is this a causal LM?")
    points = SplitPoints.parse(DEFAULT_LAYERS if layers is None else layers, num_layers)
    if checkpoint.layout != "head-tail" or checkpoint.obfuscation is not None:
        raise ConfigError(
            f"{checkpoint.path} is a {checkpoint.layout} or obfuscated checkpoint; stage chains serve plain head/tail "
            "bodies (an obfuscated body is made for one layer range, and stages each load a part of it)"
        )
    chain = StageChain(
        model, points, stages, device=device, dtype=dtype, spread=spread, idle_ttl=idle_ttl, timeout=timeout
    )
    if chain.fingerprint != checkpoint.fingerprint():
        chain.shutdown()
        raise ModelLoadError(
            f"the stages loaded {model} with fingerprint {chain.fingerprint}, this process reads "
            f"{checkpoint.fingerprint()} at {checkpoint.path}: every node must resolve {model!r} to the same checkpoint"
        )
    return SplitModel(
        name=str(model),
        path=checkpoint.path,
        config=checkpoint.config,
        points=points,
        runtime=Runtime(torch.device("cpu"), chain.dtype),  # hidden states pass through here on the CPU
        fingerprint=chain.fingerprint,
        body=ChainBody(chain),
    )


def staged_server(
    model: str,
    layers: str | tuple[int, int] | None,
    stages: int | Sequence[int],
    settings: ServerSettings,
    *,
    device: str | None = None,
    dtype: str | None = None,
    spread: bool = True,
    timeout: float = 300.0,
) -> StagedBodyServer:
    """A body server for ``model`` cut at ``layers`` (``"X:Y"``, as ``load_split``; None: its default), whose body
    runs as ``stages`` (a count, or the global layer indices where each stage after the first begins) stage actors
    on different nodes of the Ray cluster this process is connected to.

    ``device``/``dtype``: the stages' (``load_split``'s; ``device="cuda"`` reserves a GPU per stage); give
    ``dtype`` when the nodes differ (a GPU node defaults to bfloat16, a CPU node to float32): the stages must agree.
    ``spread``: one stage per node, refused on a cluster with fewer nodes than stages; ``False`` packs them.
    ``timeout``: seconds to place and load the stages.

    Serve ``server.app`` (ASGI) as usual. The stages belong to the calling process and die with it; a stage
    drops sessions idle for twice ``settings.idle_ttl`` (the server closes its own after ``idle_ttl``).
    """
    if settings.cloud_only:
        raise ConfigError("a cloud-only server runs the whole model in one process; it cannot run on stages")
    split = staged_split(
        model,
        layers,
        stages,
        device=device,
        dtype=dtype,
        spread=spread,
        idle_ttl=2 * settings.idle_ttl,
        timeout=timeout,
    )
    return StagedBodyServer(split, settings)

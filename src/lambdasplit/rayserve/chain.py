"""A body [X, Y) as a chain of stage actors on different Ray nodes, and a session's state that drives it.

::

    replica (no weights)           node 1                 node 2
    FORWARD (T, D) @ pos  --->  stage [X, m)  --(T, D)-->  stage [m, Y)  ---> RESULT (T, D) @ pos
                                KV caches per session      KV caches per session

Each step of a session goes through the stages in order, one Ray call per hop. The replica submits every hop of
a step at once, each call taking the previous one's ``ObjectRef`` as its input, and waits once for the last: Ray
starts stage i+1 when stage i's output exists, without a round trip through the replica's Python code. The hops
of one step stay sequential (stage i+1 needs stage i's output for the same positions); the steps of different
sessions overlap: the server's batcher submits every session's step it took (``ChainState.start``) before it waits
for any, and each stage runs the calls it gets in order, so session B's hop 1 runs while session A's hop 2 does.

Exactness: every stage runs the model's own layers on the float tensor the previous stage returned, unchanged
in dtype, so the chain computes what one body [X, Y) computes (tests/rayserve/test_stage_chain.py).

A stage whose process dies (killed, out of memory) is restarted by Ray in its place, up to ``STAGE_RESTARTS`` times,
with no sessions: a step that meets the loss waits for every stage to answer again and is refused with
``unknown_session``, so the device replays its history into a new session, as after an eviction, and its generation
goes on with the same tokens. A stage that does not come back within the chain's load timeout is
``stage_unavailable``: the replica's health check then fails and Serve replaces the replica.

Lifetime: the stage actors and their placement group belong to the process that made the chain (the Serve
replica). Ray kills an actor when its owner dies and removes a placement group with its creator, so a replica
that is killed takes its stages with it: its sessions' KV caches are gone, and each device replays its history
into a session on another replica (``RemoteBodyLink``), as after any server restart.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import Cache

from lambdasplit.config import SplitPoints
from lambdasplit.errors import ConfigError, LambdaSplitError, ModelLoadError, Refusal, SessionError
from lambdasplit.rayserve.stage import Stage, StageInfo
from lambdasplit.split.parts import Body
from lambdasplit.split.state import BodyState

DEFAULT_STEP_TIMEOUT = 300.0  # seconds one step may take through every stage (a long prompt on a CPU)
STAGE_RESTARTS = 3  # times Ray restarts a stage whose process died (with no sessions: their devices replay)


def stage_ranges(body: tuple[int, int], stages: int | Sequence[int]) -> list[tuple[int, int]]:
    """The global layer ranges [a, b) of each stage of the body [X, Y).

    ``stages``: a count (ranges as even as can be, the first ones one layer longer), or the global layer indices
    where each stage after the first begins, strictly increasing inside (X, Y): ``[3]`` cuts body [1, 5) into
    [1, 3) and [3, 5).
    """
    x, y = body
    if y <= x:
        raise ConfigError(f"the body [{x}, {y}) holds no layers: there is nothing to split into stages")
    if isinstance(stages, int):
        n = y - x
        if not 1 <= stages <= n:
            raise ConfigError(f"stages must be between 1 and the body's {n} layers [{x}, {y}), got {stages}")
        size, extra = divmod(n, stages)
        cuts = list(itertools.accumulate([x] + [size + (i < extra) for i in range(stages)]))
    else:
        inner = [int(c) for c in stages]
        if any(not x < c < y for c in inner) or inner != sorted(set(inner)):
            raise ConfigError(
                f"stage boundaries must be strictly increasing layer indices inside the body ({x}, {y}), got {inner}"
            )
        cuts = [x, *inner, y]
    return list(itertools.pairwise(cuts))


class _StageActor(Stage):
    """A ``Stage`` that knows the Ray node it was placed on."""

    def __init__(self, model: str, layers: tuple[int, int], **options: Any) -> None:
        super().__init__(model, layers, node_id=ray.get_runtime_context().get_node_id(), **options)


class StageChain:
    """The body ``points`` of ``model`` as one stage actor per range of ``stages``, each on its own node.

    ``spread``: place each stage on a different node (a STRICT_SPREAD placement group); with fewer alive nodes
    than stages that is a ``ConfigError`` unless ``spread=False``, which packs stages where they fit.
    ``device``/``dtype`` are the stages' (``load_split``'s); ``device="cuda"`` reserves one GPU per stage.
    ``idle_ttl``: a stage drops a session idle that long (the replica closes its sessions before that).
    ``timeout``: seconds to place the stages and load their layers.
    Must run in a process connected to a Ray cluster (``ray.init`` done), which then owns the actors.
    """

    def __init__(
        self,
        model: str,
        points: SplitPoints,
        stages: int | Sequence[int],
        *,
        device: str | None = None,
        dtype: str | None = None,
        spread: bool = True,
        idle_ttl: float = 600.0,
        timeout: float = 300.0,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        if not ray.is_initialized():
            raise ConfigError("a stage chain needs a Ray cluster: call ray.init(address=...) in this process first")
        self.model, self.points = model, points
        self.ranges = stage_ranges((points.head_layers, points.body_end), stages)
        self.step_timeout, self.load_timeout = step_timeout, timeout
        self.restarts = 0  # stage restarts met by a step so far
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # session ids unique to this chain, should two chains share a stage
        k = len(self.ranges)
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
        if spread and alive < k:
            raise ConfigError(
                f"{k} stages {self.ranges} spread over different nodes need {k} Ray nodes; the cluster has {alive} "
                "alive. Add nodes, ask for fewer stages, or pass spread=False to pack stages onto fewer nodes."
            )
        gpu = device is not None and device.startswith("cuda")
        bundle = {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}
        strategy = "STRICT_SPREAD" if spread else "SPREAD"  # SPREAD: on different nodes where it can
        self.placement: PlacementGroup = placement_group([dict(bundle)] * k, strategy=strategy)
        try:
            ray.get(self.placement.ready(), timeout=timeout)
        except GetTimeoutError:
            remove_placement_group(self.placement)
            raise ConfigError(
                f"could not place {k} stages of {bundle} each ({'one per node' if spread else 'packed'}) within "
                f"{timeout:.0f} s; the cluster has {ray.available_resources()} available"
            ) from None
        # Any: Ray types an actor's methods as the plain functions or their remote form, which mypy cannot call.
        actor: Any = ray.remote(_StageActor)
        self.actors: list[Any] = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i),
                num_cpus=1,
                num_gpus=1 if gpu else 0,
                max_concurrency=1,  # one call at a time: a stage's sessions share its layers
                max_restarts=STAGE_RESTARTS,  # a dead stage comes back empty ...
                max_task_retries=0,  # ... and no step is run again on it: its session's cache is gone
            ).remote(model, r, device=device, dtype=dtype, idle_ttl=idle_ttl)
            for i, r in enumerate(self.ranges)
        ]
        try:
            self.infos = self._infos(timeout)
        except BaseException:
            self.shutdown()
            raise
        self._check(spread)

    def _infos(self, timeout: float) -> list[StageInfo]:
        infos = []
        for i, (r, stage) in enumerate(zip(self.ranges, self.actors, strict=True)):
            try:
                infos.append(ray.get(stage.info.remote(), timeout=timeout))
            except RayActorError as exc:  # its __init__ raised: the load failed
                raise ModelLoadError(f"stage {i} (layers {list(r)}) of {self.model} did not start: {exc}") from None
            except GetTimeoutError:
                raise ModelLoadError(
                    f"stage {i} (layers {list(r)}) of {self.model} did not load within {timeout:.0f} s"
                ) from None
        return infos

    def _check(self, spread: bool) -> None:
        """Every stage holds the same checkpoint in the same dtype, and spread stages run on different nodes."""
        first = self.infos[0]
        for i, info in enumerate(self.infos):
            if (info.fingerprint, info.dtype) != (first.fingerprint, first.dtype):
                self.shutdown()
                raise ModelLoadError(
                    f"stage {i} holds {info.name} with fingerprint {info.fingerprint} in {info.dtype}; stage 0 holds "
                    f"{first.fingerprint} in {first.dtype}: every stage must load the same checkpoint and dtype"
                )
        nodes = [info.node_id for info in self.infos]
        assert not spread or len(set(nodes)) == len(nodes), nodes  # STRICT_SPREAD placed them

    @property
    def fingerprint(self) -> str:
        return self.infos[0].fingerprint

    @property
    def dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.infos[0].dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    def new_session(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    @property
    def trees(self) -> bool:
        """Whether every stage's caches can keep a branch of a token tree (full attention), so the chain verifies
        token trees (the replica's WELCOME says ``"trees"``)."""
        return all(info.trees for info in self.infos)

    def submit(
        self, session: str, hidden: torch.Tensor, position: int, reset: bool, last: bool, tree: list[int] | None = None
    ) -> ray.ObjectRef[torch.Tensor]:
        """Submit one step through every stage, each hop fed the previous hop's reference; the last hop's reference.

        ``hidden`` (T, D) on the CPU; ``last`` applies to the last stage only (the others return every row); ``tree``
        (the rows' parents, a token tree) to every stage: each runs its layers under the same tree mask.
        """
        ref: Any = hidden
        for i, stage in enumerate(self.actors):
            ref = stage.forward.remote(session, ref, position, reset, last and i == len(self.actors) - 1, tree)
        return ref

    def keep(self, session: str, start: int, rows: list[int]) -> list[ray.ObjectRef[None]]:
        """Submit the keeping of a token tree's branch (``BodyState.keep``) to every stage; their references, for
        ``settle``. Not waited for here: a stage runs it before the session's next step (Ray runs one caller's calls
        to an actor in order)."""
        return [stage.keep.remote(session, start, rows) for stage in self.actors]

    def result(self, ref: ray.ObjectRef[torch.Tensor]) -> torch.Tensor:
        """Wait for a submitted step: (T, D), or (1, D) with ``last``. A stage's own refusal (an unknown session, a
        bad position) is raised as itself; a stage that died and was restarted is ``unknown_session`` (the device
        replays), once every stage answers again; one that did not come back, or a step past ``step_timeout``, is
        ``Refusal("stage_unavailable")``."""
        out = self.settle(ref)
        assert isinstance(out, torch.Tensor)
        return out

    def settle(self, refs: Any) -> Any:
        """``ray.get(refs)`` for calls submitted to the stages, with ``result``'s errors."""
        try:
            return ray.get(refs, timeout=self.step_timeout)
        except (RayActorError, GetTimeoutError) as exc:  # a lost stage before the last fails the next one's call
            # as its input: a RayTaskError that is also the RayActorError, hence this clause first
            if isinstance(exc, RayActorError) and self._restarted():
                raise SessionError(
                    f"a stage of this server's body (layers {self.ranges}) was restarted and lost this session's "
                    "cache: open a new session and replay it",
                    "unknown_session",
                ) from exc
            raise Refusal(
                "stage_unavailable",
                f"a stage of this server's body (layers {self.ranges}) did not answer: {type(exc).__name__}; "
                "the server is being replaced, retry on another",
            ) from exc
        except RayTaskError as exc:
            if isinstance(exc.cause, LambdaSplitError):
                raise exc.cause from None
            raise

    def run(
        self, session: str, hidden: torch.Tensor, position: int, reset: bool, last: bool, tree: list[int] | None = None
    ) -> torch.Tensor:
        """One step of ``session`` through every stage: ``hidden`` (T, D) at ``position`` -> (T, D) ((1, D): last)."""
        return self.result(self.submit(session, hidden, position, reset, last, tree))

    def close(self, session: str) -> None:
        """Drop ``session`` on every stage. Not waited for: a stage runs it after the session's last step (Ray
        runs one caller's calls to an actor in order)."""
        for stage in self.actors:
            stage.close.remote(session)

    def _restarted(self) -> bool:
        """After a stage was lost: whether every stage answers again within the load timeout (Ray restarted the
        lost one, which reloaded its layers)."""
        if self._answers(self.load_timeout) is None:
            return False
        self.restarts += 1
        return True

    def _answers(self, timeout: float) -> list[StageInfo] | None:
        """Every stage's info, waiting up to ``timeout`` s for a stage that Ray is restarting (the infos are kept);
        None if one is dead for good (no restarts left) or does not answer in time."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = [ray.get(s.info.remote(), timeout=max(0.1, deadline - time.monotonic())) for s in self.actors]
            except ActorUnavailableError:  # restarting: its new process is still loading
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.2)
                continue
            except (RayActorError, GetTimeoutError):
                return None
            self.infos = infos
            return infos

    def check(self, timeout: float = 30.0) -> list[StageInfo]:
        """Every stage's info, fresh (a stage being restarted is waited for); ``Refusal("stage_unavailable")`` if one
        does not answer within ``timeout`` (a health check)."""
        infos = self._answers(timeout)
        if infos is None:
            raise Refusal("stage_unavailable", f"a stage of layers {self.ranges} did not answer within {timeout:.0f} s")
        return infos

    def held_positions(self, session: str) -> list[int]:
        """Positions each stage holds for ``session`` (what a rollback must agree on across stages)."""
        return [ray.get(s.held_positions.remote(session)) for s in self.actors]

    def shutdown(self) -> None:
        """Kill the stage actors and free their placement (the owner's death does the same)."""
        for stage in getattr(self, "actors", []):
            ray.kill(stage)
        remove_placement_group(self.placement)

    def body(self) -> ChainBody:
        return ChainBody(self)

    def describe(self) -> list[dict[str, Any]]:
        """The stages as a replica reports them: layers, node, device and dtype."""
        return [{"layers": list(i.layers), "node": i.node_id, "device": i.device, "dtype": i.dtype} for i in self.infos]


class ChainBody(Body):
    """A body [X, Y) whose layers run on a ``StageChain``: it holds no weights and no cache here.

    Sessions of a server get a ``ChainState`` each (``new_cache`` is None, so the batcher runs their steps one by
    one). Called directly it runs ``hidden`` (1, T, D) from position 0 through a throw-away session (the server's
    warm-up); it takes no cache, attention mask or position ids (those are for batches of local caches).
    """

    def __init__(self, chain: StageChain) -> None:
        super().__init__(None, chain.points.head_layers, chain.points.body_end)
        self.chain = chain

    def forward(
        self,
        hidden: torch.Tensor,
        cache: Cache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last: bool = False,
    ) -> torch.Tensor:
        if cache is not None or attention_mask is not None or position_ids is not None or hidden.shape[0] != 1:
            raise ConfigError(
                f"a stage-chained body runs one sequence (1, T, D) without a local cache, mask or positions, got "
                f"{list(hidden.shape)}; sessions keep their caches on the stages (ChainState)"
            )
        session = self.chain.new_session()
        try:
            return self.chain.run(session, hidden[0].cpu(), 0, True, last).unsqueeze(0)
        finally:
            self.chain.close(session)

    def extra_repr(self) -> str:
        return f"layers=[{self.start}, {self.stop}), stages={self.chain.ranges}"


class ChainState(BodyState):
    """One session's body on a ``StageChain``: ``BodyState``'s interface and position rules, its caches on the stages.

    ``length`` is what every stage holds after a step that succeeded. A step that fails part-way leaves the stages
    before the failure advanced and the rest where they were, all holding at least ``position``; ``length``
    goes back to ``position`` (``undo``), and the next step, at ``position`` or before, rolls every stage back to
    where it starts.
    """

    def __init__(self, body: ChainBody) -> None:
        super().__init__(body)  # cache None: nothing held here
        self.chain = body.chain
        self.session = self.chain.new_session()
        self.closed = False
        self._keeps: list[ray.ObjectRef[None]] = []  # a branch kept on the stages, settled at the next step

    @property
    def supports_trees(self) -> bool:
        return self.chain.trees

    def keep(self, start: int, rows: list[int]) -> None:
        """``BodyState.keep`` on every stage (checked here against ``length``, which every stage holds)."""
        self.check_keep(start, rows)
        self._keeps = self.chain.keep(self.session, start, rows)
        self.length = start + len(rows)

    def forward(
        self,
        hidden: torch.Tensor,
        position: int,
        reset: bool = False,
        last: bool = False,
        tree: list[int] | None = None,
    ) -> torch.Tensor:
        """``hidden`` (1, T, D) at ``position`` through every stage; (1, T, D), or (1, 1, D) with ``last``."""
        return self.start(hidden, position, reset, last, tree)()

    def start(
        self,
        hidden: torch.Tensor,
        position: int,
        reset: bool = False,
        last: bool = False,
        tree: list[int] | None = None,
    ) -> Callable[[], torch.Tensor]:
        """Submit the step to the stages and return at once what waits for its output: the batcher submits every
        session's step it took before waiting for any, so while one session's step is on stage 2 the next one's
        runs on stage 1."""
        if self.closed:
            raise SessionError(f"session {self.session} was closed", "unknown_session")
        if tree is not None:
            self.check_tree_rows(tree, hidden.shape[1], reset)
        self.check(position, reset)
        keeps, self._keeps = self._keeps, []
        ref = self.chain.submit(self.session, hidden[0].cpu(), position, reset, last, tree)  # Ray: nothing to undo

        def finish() -> torch.Tensor:
            try:
                if keeps:  # the branch kept since the last step: done on every stage (or why not) before this one
                    self.chain.settle(keeps)
                out = self.chain.result(ref)
            except BaseException:
                self.undo(position)
                raise
            self.length = position + hidden.shape[1]
            self.steps += 1
            return out.unsqueeze(0)

        return finish

    def undo(self, position: int) -> None:
        self.length = position  # each stage undid its own failed forward; the next step rolls the rest back

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.chain.close(self.session)
        super().close()

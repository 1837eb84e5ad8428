"""The body server as a Ray Serve deployment: replicas behind Serve's proxy, one device connection per replica.

Each replica is the ordinary ``BodyServer`` ASGI app (the same frames, auth, limits and continuous batching) on its
own copy of the body. A device's WebSocket is one Serve request for its whole life, so it stays on the replica that
accepted it and its sessions and KV caches live there; Serve's proxy routes each *new* connection to a replica
with room. Hence the deployment options, set from the server's own settings:

- ``max_ongoing_requests`` = ``max_sessions``: Serve counts an open WebSocket as one ongoing request. Its default
  of 5 would queue the sixth device in the proxy while the replica still had room.
- autoscaling on ``target_ongoing_requests``: connected devices per replica, i.e. sessions.
- routing to the replica with the fewest connections (``routing.FewestConnectionsRouter``), not Serve's default
  preference for replicas on the proxy's node, which would pile long-lived connections onto one replica.
- ``graceful_shutdown_timeout_s`` = ``drain_seconds`` + a margin: a replica that Serve stops (scale-down, a new
  version) drains like ``lambdasplit serve`` on SIGTERM: it sends every device GOAWAY, the devices move to another
  replica through the same URL and replay their sessions there, and the replica exits once they have left.

A replica that dies without draining (a lost node, ``ray.kill``) drops its connections; devices reconnect to the
same URL, the proxy sends them to a live replica, and they replay what the lost one held (``client.connection``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig

from lambdasplit.errors import ConfigError
from lambdasplit.server import ServerSettings
from lambdasplit.server.app import BodyServer

_log = logging.getLogger("lambdasplit.rayserve")

#: The Serve application's and deployment's names (``serve status`` shows them).
APP_NAME = "lambdasplit"
DEPLOYMENT_NAME = "BodyReplica"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads: the model cut at ``layers`` (only the body is built), on ``device``/``dtype``,
    served with ``settings`` (tokens, limits; its host/port/TLS are the proxy's, see ``ServeOptions``)."""

    model: str
    layers: str | None = None
    settings: ServerSettings = field(default_factory=ServerSettings)
    device: str | None = None
    dtype: str | None = None
    #: Run each replica's body as a chain of stage actors (a count, or the layers where stages after the first
    #: begin), one per node (``spread``; else packed): the replica then holds no body weights (``stages.py``).
    stages: int | tuple[int, ...] | None = None
    spread: bool = True


@dataclass(frozen=True)
class Scaling:
    """How many replicas: ``replicas`` fixed, or between ``min_replicas`` and ``max_replicas`` with Serve's
    autoscaler aiming at ``target_sessions`` connected devices per replica."""

    replicas: int | None = 1
    min_replicas: int = 1
    max_replicas: int = 1
    target_sessions: float = 8.0
    #: Seconds the load must stay above (below) the target before a replica is added (removed).
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    #: Seconds of load the autoscaler averages over, and how often replicas report it.
    look_back_period_s: float = 10.0
    metrics_interval_s: float = 2.0
    #: Logical CPUs Ray reserves for each replica (torch in the replica uses that many threads).
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"replicas={self.replicas} is invalid: must be >= 1")
        if self.replicas is None and not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"autoscaling between {self.min_replicas} and {self.max_replicas} replicas is invalid: "
                "need 1 <= min <= max"
            )
        if self.target_sessions <= 0:
            raise ConfigError(f"target_sessions={self.target_sessions} is invalid: must be > 0")
        if self.cpus_per_replica < 0:
            raise ConfigError(f"cpus_per_replica={self.cpus_per_replica} is invalid: must be >= 0")

    @classmethod
    def autoscale(cls, bounds: str, **kwargs: Any) -> Scaling:
        """``"MIN:MAX"`` replicas, autoscaled."""
        try:
            low, high = (int(x) for x in bounds.split(":"))
        except ValueError:
            raise ConfigError(f"autoscale bounds look like MIN:MAX (e.g. 1:4), got {bounds!r}") from None
        return cls(replicas=None, min_replicas=low, max_replicas=high, **kwargs)


def _replica_stopping() -> bool | None:
    """Whether Serve has begun this replica's graceful shutdown; None where this Ray does not show it.

    Serve announces nothing to user code before it waits for the replica's requests to finish: the ASGI lifespan's
    shutdown and ``__del__`` run only after that wait, when the devices' connections (requests that last as long
    as the device is connected) have been cut at ``graceful_shutdown_timeout_s``. So the replica looks at Serve's
    own replica object in its process (Ray keeps the actor instance in ``global_worker.actors``) for the flag its
    graceful shutdown sets first. A private attribute: tests/rayserve checks the scale-down drain, so a Ray that
    moves it fails a test instead of silently cutting devices off (they would still replay elsewhere).
    """
    import ray._private.worker

    for actor in list(ray._private.worker.global_worker.actors.values()):
        replica = getattr(actor, "_replica_impl", None)
        if replica is not None and hasattr(replica, "_shutting_down"):
            return bool(replica._shutting_down)
    return None


@serve.ingress()
class BodyReplica:
    """One replica: a ``BodyServer`` on its own copy of the body, its ASGI app served through Serve's proxy."""

    async def __init__(self, spec: ReplicaSpec) -> None:  # type: ignore[misc]  # Serve awaits it
        # Imported here: loading pulls in transformers, which the driver that only deploys does not need.
        from lambdasplit.rayserve.stages import StagedBodyServer, staged_server
        from lambdasplit.split import load_split

        self.spec = spec
        self.replica = serve.get_replica_context().replica_tag
        self.server: BodyServer
        if spec.stages is not None:
            self.server = await asyncio.to_thread(
                staged_server, spec.model, spec.layers, spec.stages, spec.settings,
                device=spec.device, dtype=spec.dtype, spread=spec.spread,
            )  # fmt: skip
        else:
            split = await asyncio.to_thread(
                load_split, spec.model, spec.layers, parts=["body"], device=spec.device, dtype=spec.dtype, quiet=True
            )
            self.server = BodyServer(split, spec.settings)
        self._staged = self.server if isinstance(self.server, StagedBodyServer) else None
        # Devices learn they talk to one replica of several behind this URL: a GOAWAY may then move them to the
        # same URL (the proxy sends the new connection to another replica).
        self.server.announced["replica"] = self.replica
        self._watch = asyncio.get_running_loop().create_task(self._drain_when_stopped())

    def __serve_build_asgi_app__(self) -> Any:
        return self.server.app

    async def check_health(self) -> None:
        """Serve's health check: with stages, every stage actor answers (a lost one fails the replica, and Serve
        replaces it with a new replica and a new chain; its devices replay there)."""
        if self._staged is not None:
            await asyncio.to_thread(self._staged.chain.check)

    async def _drain_when_stopped(self, period: float = 0.25) -> None:
        while True:
            await asyncio.sleep(period)
            stopping = _replica_stopping()
            if stopping is None:
                _log.warning("this Ray version does not show a replica's shutdown: scale-down will cut devices off")
                return
            if stopping:
                await self.server.drain(self.spec.settings.drain_seconds)
                return


def body_application(spec: ReplicaSpec, scaling: Scaling) -> serve.Application:
    """The Serve application of ``spec``'s body with ``scaling``'s replicas (``serve.run`` it)."""
    s = spec.settings
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": s.max_sessions,
        # Leave time for GOAWAY, the devices' moves and the connections to close.
        "graceful_shutdown_timeout_s": s.drain_seconds + 5.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica},
        # New connections go to the replica with the fewest, not to the proxy's node first (routing.py).
        "request_router_config": {"request_router_class": "lambdasplit.rayserve.routing.FewestConnectionsRouter"},
    }
    if scaling.replicas is not None:
        options["num_replicas"] = scaling.replicas
    else:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            initial_replicas=scaling.min_replicas,
            target_ongoing_requests=scaling.target_sessions,
            upscale_delay_s=scaling.upscale_delay_s,
            downscale_delay_s=scaling.downscale_delay_s,
            look_back_period_s=scaling.look_back_period_s,
            metrics_interval_s=scaling.metrics_interval_s,
        )
    return serve.deployment(**options)(BodyReplica).bind(spec)

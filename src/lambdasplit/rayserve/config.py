"""The body application from a Serve config file: ``import_path: lambdasplit.rayserve:app`` and its ``args``.

This is how ``serve run``, ``serve deploy`` and a KubeRay RayService deploy what ``lambdasplit serve --ray`` deploys
(docs/ray.md has both files). ``args`` (all optional but ``model``)::

    model: smollm2-135m-instruct    # what --model takes
    layers: "2:-2"
    device: cpu                     # default: CUDA when the replica has a GPU
    dtype: float32
    replicas: 2                     # or autoscale: "1:4" with target_sessions: 8
    stages: 2                       # each replica's body as 2 stage actors on 2 nodes (or [15]: where they begin)
    cpus_per_replica: 1
    max_sessions: 64                # any ServerSettings limit: max_context, drain_seconds, max_batch, idle_ttl, ...

The bearer token is not written in the file: replicas accept ``$LAMBDASPLIT_TOKEN`` of the process that builds the
application (a Kubernetes secret in the head pod's environment, or ``runtime_env.env_vars``). Serve's proxy, not
the app, owns the address and TLS: ``http_options`` (``host``, ``port``, ``ssl_certfile``, ``ssl_keyfile``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray import serve

from lambdasplit.errors import ConfigError
from lambdasplit.rayserve.deployment import ReplicaSpec, Scaling, body_application
from lambdasplit.server.settings import ServerSettings

#: ServerSettings fields a config may set: the replica's limits (address and TLS belong to Serve's proxy).
_LIMITS = {f.name for f in dataclasses.fields(ServerSettings)} - {
    "host", "port", "tokens", "tls", "tls_cert", "tls_key", "tls_dir", "cloud_only", "wire_dtypes"
}  # fmt: skip
_SCALING = {"replicas", "autoscale", "target_sessions", "cpus_per_replica"}
_SPEC = {"model", "layers", "device", "dtype", "stages", "spread"}


def app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: the body replicas that ``args`` describe (see the module's docstring)."""
    unknown = sorted(set(args) - _LIMITS - _SCALING - _SPEC)
    if unknown:
        allowed = ", ".join(sorted(_SPEC | _SCALING | _LIMITS))
        raise ConfigError(f"unknown lambdasplit args {', '.join(unknown)}; allowed: {allowed}")
    if "model" not in args:
        raise ConfigError("the lambdasplit application needs args.model (an embedded model name or a checkpoint path)")
    token = os.environ.get("LAMBDASPLIT_TOKEN")
    # The proxy terminates TLS; the replicas behind it speak plain WebSocket to it inside the cluster.
    settings = ServerSettings(
        tokens=(token,) if token else (), tls="off", **{k: v for k, v in args.items() if k in _LIMITS}
    )
    scale = {k: v for k, v in args.items() if k in _SCALING and k != "autoscale"}
    if "autoscale" in args:
        scaling = Scaling.autoscale(str(args["autoscale"]), **{k: v for k, v in scale.items() if k != "replicas"})
    else:
        scaling = Scaling(**scale)
    stages = args.get("stages")
    stages = tuple(stages) if isinstance(stages, list) else stages
    spec = ReplicaSpec(
        str(args["model"]), args.get("layers"), settings, args.get("device"), args.get("dtype"), stages,
        bool(args.get("spread", True)),
    )  # fmt: skip
    return body_application(spec, scaling)

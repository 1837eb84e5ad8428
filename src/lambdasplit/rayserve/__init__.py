"""Body servers on Ray (docs/ray.md). Needs the ``lambdasplit[ray]`` extra; nothing else in the package imports it.

- ``deployment``: the body server as Ray Serve replicas behind one URL (``lambdasplit serve --ray``, ``run``), with
  ``routing`` (new devices to the replica with the fewest) and ``config.app``, the application builder of a Serve
  config file or a KubeRay RayService (``import_path: lambdasplit.rayserve:app``);
- ``stages.staged_server``: a body server whose body runs as stage actors on other nodes (what a replica calls);
- ``chain``: the stage actors placed one per node, and a session's state that drives them;
- ``stage``: one stage, global layers [a, b) with a KV cache per session;
- ``local.local_cluster``: a Ray cluster of several nodes on this machine (tests, benchmarks, demos).
"""

from lambdasplit.rayserve.config import app
from lambdasplit.rayserve.deployment import ReplicaSpec, Scaling, body_application
from lambdasplit.rayserve.run import deploy, serve_on_ray
from lambdasplit.rayserve.stages import staged_server

__all__ = ["ReplicaSpec", "Scaling", "app", "body_application", "deploy", "serve_on_ray", "staged_server"]

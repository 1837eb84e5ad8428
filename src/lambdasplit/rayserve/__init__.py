"""Body servers on Ray: replicas of the body server as a Ray Serve deployment (``lambdasplit serve --ray``), and a
body split into a chain of stage actors across machines. Needs the ``lambdasplit[ray]`` extra; nothing else in the
package imports it.

A Serve config file (or a KubeRay RayService) deploys the same application through ``app``: ``import_path:
lambdasplit.rayserve:app`` with ``args`` (``config.build_app``).
"""

from lambdasplit.rayserve.config import app
from lambdasplit.rayserve.deployment import ReplicaSpec, Scaling, body_application
from lambdasplit.rayserve.run import deploy, serve_on_ray

__all__ = ["ReplicaSpec", "Scaling", "app", "body_application", "deploy", "serve_on_ray"]

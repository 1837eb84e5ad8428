"""Deploy the body on Ray Serve and serve until stopped: ``lambdasplit serve --ray``.

``address`` picks the cluster: ``"local"`` starts a one-machine Ray for this command (stopped with it), ``"auto"``
joins the cluster this machine belongs to (``ray start --head`` / ``--address`` ran before), anything else is a Ray
address (``HOST:PORT`` of the head's GCS, or ``ray://HOST:10001``). Serve's proxy listens on ``settings.host`` and
``settings.port`` and speaks wss:// with the same certificate rules as ``lambdasplit serve`` (``ServerSettings.tls``);
the replicas run the body server's app behind it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
from ray import serve

from lambdasplit.errors import ConfigError
from lambdasplit.rayserve.deployment import APP_NAME, ReplicaSpec, Scaling, body_application
from lambdasplit.server.app import PATH
from lambdasplit.server.settings import ServerSettings


def start_ray(address: str, *, num_cpus: int | None = None) -> None:
    """Join (or, for ``"local"``, start) the Ray cluster, once per process."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def http_options(settings: ServerSettings) -> dict[str, Any]:
    """Serve's proxy options for ``settings`` (which ``with_certificate`` has resolved)."""
    options: dict[str, Any] = {"host": settings.host, "port": settings.port}
    if settings.tls_cert is not None and settings.tls_key is not None:
        options |= {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    return options


def deploy(spec: ReplicaSpec, scaling: Scaling, *, proxy_location: str = "HeadOnly") -> str:
    """Start Serve's proxy and deploy the body (blocks until every replica has loaded); returns the devices' URL.

    ``proxy_location``: "HeadOnly" (one proxy, on the head node) or "EveryNode" (a proxy on every node with a
    replica, for a load balancer in front; on one machine the proxies would fight over the port).
    """
    settings = spec.settings.with_certificate()
    spec = replace(spec, settings=settings)
    wanted = http_options(settings)
    serve.start(proxy_location=proxy_location, http_options=wanted)
    _check_proxy(wanted)
    serve.run(body_application(spec, scaling), name=APP_NAME, route_prefix="/", blocking=False)
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{settings.scheme}://{host}:{settings.port}{PATH}"


def _check_proxy(wanted: dict[str, Any]) -> None:
    """Serve keeps the proxy options of its first start on a cluster: refuse to announce a URL it does not serve."""
    from ray.serve.context import _get_global_client  # no public getter for the running proxy's options

    client = _get_global_client()
    assert client is not None  # serve.start has just connected it
    running = client.http_config
    have = {"host": running.host, "port": running.port, "ssl_certfile": running.ssl_certfile}
    want = {"host": wanted["host"], "port": wanted["port"], "ssl_certfile": wanted.get("ssl_certfile")}
    if have != want:
        raise ConfigError(
            f"Serve already runs on this Ray cluster with its proxy at {have['host']}:{have['port']} "
            f"({'TLS ' + str(have['ssl_certfile']) if have['ssl_certfile'] else 'no TLS'}), and keeps those options "
            f"until `serve shutdown`; asked for {want['host']}:{want['port']} "
            f"({'TLS' if want['ssl_certfile'] else 'no TLS'}): pass the running proxy's --host/--port (and TLS), or "
            "shut Serve down first"
        )


def serve_on_ray(
    spec: ReplicaSpec,
    scaling: Scaling,
    address: str,
    on_ready: Callable[[str], None],
    *,
    proxy_location: str = "HeadOnly",
) -> None:
    """Deploy, call ``on_ready(url)``, then wait for SIGINT/SIGTERM and take the application down (its replicas
    drain: devices get GOAWAY and ``drain_seconds`` to leave). A local Ray started here stops with it."""
    start_ray(address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        on_ready(deploy(spec, scaling, proxy_location=proxy_location))
        while not stop.wait(0.5):  # a timed wait, so the signal handlers run promptly
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.delete(APP_NAME)
        if address == "local":
            serve.shutdown()
            ray.shutdown()

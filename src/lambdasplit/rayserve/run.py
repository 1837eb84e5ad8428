"""Deploy the body on Ray Serve and serve until stopped: ``lambdasplit serve --ray``.

``address`` picks the cluster: ``"local"`` starts a one-machine Ray for this command (stopped with it), ``"auto"``
joins the cluster this machine belongs to (``ray start --head`` / ``--address`` ran before), anything else is a Ray
address (``HOST:PORT`` of the head's GCS, or ``ray://HOST:10001``). Serve's proxy listens on ``settings.host`` and
``settings.port`` and speaks wss:// with the same certificate rules as ``lambdasplit serve`` (``ServerSettings.tls``);
the replicas run the body server's app behind it.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayTaskError

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
    settings = _start_proxy(spec.settings.with_certificate(), proxy_location)
    spec = replace(spec, settings=settings)
    serve.run(body_application(spec, scaling), name=APP_NAME, route_prefix="/", blocking=False)
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{settings.scheme}://{host}:{settings.port}{PATH}"


#: How many free ports ``port=0`` tries: another process may take the one picked before Serve's proxy binds it.
PORT_ATTEMPTS = 3


def _start_proxy(settings: ServerSettings, proxy_location: str) -> ServerSettings:
    """Start Serve's proxy on ``settings``' host and port, and return the settings with the port it listens on.
    Port 0: a free port picked here (Serve needs a fixed one), and another if a process took it before the proxy
    bound it. A port in use is a ``ConfigError`` that says so, not Ray's traceback."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        chosen = settings if settings.port else replace(settings, port=free_port(settings.host))
        wanted = http_options(chosen)
        try:
            serve.start(proxy_location=proxy_location, http_options=wanted)
        except RayTaskError as exc:
            if "Failed to bind" not in str(exc):
                raise
            serve.shutdown()  # the controller this start made: Serve starts afresh on the next port
            if settings.port == 0 and attempt < PORT_ATTEMPTS:
                continue
            raise ConfigError(
                f"Serve's proxy could not listen on {chosen.host}:{chosen.port}: the port is in use "
                "(pass another --port, or 0 for a free one)"
            ) from None
        _check_proxy(wanted)
        return chosen
    raise AssertionError("unreachable: the last attempt returns or raises")


def free_port(host: str) -> int:
    """A port nothing listens on at ``host`` now (the kernel's choice)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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

"""Run as a script by ``test_serve_ray_cli.py`` (a Ray of its own: the suite's shared cluster keeps one Serve proxy
for its whole session): Serve's proxy on a port in use, and ``--port 0`` when another process takes the free port
picked for it first. Prints one JSON line."""

from __future__ import annotations

import json
import socket

import ray

from lambdasplit.errors import ConfigError
from lambdasplit.rayserve import run
from lambdasplit.server.settings import ServerSettings


def main() -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    result: dict[str, object] = {"taken": taken}
    try:
        try:
            run._start_proxy(ServerSettings(port=taken), "HeadOnly")
        except ConfigError as exc:
            result["explicit"] = str(exc)
        picks = iter([taken])  # the race: the first free port picked is taken before the proxy binds it
        real = run.free_port
        run.free_port = lambda host: next(picks, None) or real(host)  # type: ignore[assignment]
        chosen = run._start_proxy(ServerSettings(port=0), "HeadOnly")
        result["chosen"] = chosen.port
        with socket.create_connection(("127.0.0.1", chosen.port), timeout=10):
            result["listening"] = True
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        held.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

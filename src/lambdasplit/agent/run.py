"""Run a DeviceAgent under uvicorn, announcing its URL once it listens (``--port 0`` picks a free port)."""

from __future__ import annotations

import socket

import uvicorn

from lambdasplit.agent.app import DeviceAgent

READY = "lambdasplit-up: listening on "


class _AnnouncingServer(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:  # bind failed; uvicorn has said why
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"{READY}http://{host}:{port}", flush=True)


def run_agent(agent: DeviceAgent, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (SIGINT/SIGTERM)."""
    config = uvicorn.Config(agent.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    _AnnouncingServer(config).run()

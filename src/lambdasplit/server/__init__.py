"""The cloud side: a body server that many devices share."""

from lambdasplit.server.app import PATH, PROTOCOL, BodyServer
from lambdasplit.server.diffusion import DiffusionServer
from lambdasplit.server.run import READY, serve, serve_app
from lambdasplit.server.settings import ServerSettings

__all__ = ["PATH", "PROTOCOL", "READY", "BodyServer", "DiffusionServer", "ServerSettings", "serve", "serve_app"]

"""The cloud side: a body server that many devices share."""

from lambdasplit.server.app import PATH, PROTOCOL, BodyServer
from lambdasplit.server.run import READY, serve
from lambdasplit.server.settings import ServerSettings

__all__ = ["PATH", "PROTOCOL", "READY", "BodyServer", "ServerSettings", "serve"]

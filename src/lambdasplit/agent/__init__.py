"""The device agent: an OpenAI-compatible endpoint and a web UI on the user's device (``lambdasplit up``)."""

from lambdasplit.agent.app import AgentSettings, DeviceAgent
from lambdasplit.agent.feed import NetworkFeed, ObservedLink
from lambdasplit.agent.schema import ApiError

__all__ = ["AgentSettings", "ApiError", "DeviceAgent", "NetworkFeed", "ObservedLink"]

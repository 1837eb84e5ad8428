"""Privacy tools: what an attacker intercepts, the attacks that read it, the defences they measure."""

from lambdasplit.privacy.intercept import Intercept, RecordingLink, intercept

__all__ = ["Intercept", "RecordingLink", "intercept"]

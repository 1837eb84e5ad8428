"""Privacy tools: what an attacker intercepts, the attacks that read it, the defences they measure.

Every privacy statement the project makes is a figure from ``run_audit`` (``lambdasplit audit``), with
the configuration it holds for; see docs/threat-model.md.
"""

from lambdasplit.privacy.audit import AuditReport, AuditSettings, run_audit
from lambdasplit.privacy.intercept import Intercept, RecordingLink, intercept
from lambdasplit.privacy.keys import ObfuscationKey, make_key
from lambdasplit.privacy.obfuscate import protect

__all__ = [
    "AuditReport",
    "AuditSettings",
    "Intercept",
    "ObfuscationKey",
    "RecordingLink",
    "intercept",
    "make_key",
    "protect",
    "run_audit",
]

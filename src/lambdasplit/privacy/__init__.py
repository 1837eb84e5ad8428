"""What a deployment uses to protect the link: what it carries (``intercept``), keys and obfuscation, noise.

The research suite that measures these defences (the attacks and ``run_audit``) is ``lambdasplit.audit``;
no module here imports it. Every privacy statement the project makes is a figure from that audit
(``lambdasplit audit``), with the configuration it holds for; see docs/threat-model.md.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lambdasplit.privacy.intercept import Intercept, RecordingLink, intercept
from lambdasplit.privacy.keys import ObfuscationKey, make_key
from lambdasplit.privacy.obfuscate import protect

__all__ = [
    "Intercept",
    "ObfuscationKey",
    "RecordingLink",
    "intercept",
    "make_key",
    "protect",
]

#: Names this package exported before the audit moved out; they still resolve, with a DeprecationWarning.
_MOVED_TO_AUDIT = frozenset({"AuditReport", "AuditSettings", "run_audit"})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_AUDIT:
        # Imported by name, on first use only: the product package must not depend on the research suite.
        warnings.warn(
            f"lambdasplit.privacy.{name} moved to lambdasplit.audit.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("lambdasplit.audit"), name)
    raise AttributeError(f"module 'lambdasplit.privacy' has no attribute {name!r}")

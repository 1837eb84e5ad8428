"""The research suite: the attacks on what the link carries, and ``run_audit`` (``lambdasplit audit``) that runs
them per split point and defence, for an eavesdropper and a curious cloud, with each defence's utility cost.

Every privacy statement the project makes is a figure from this audit; see docs/threat-model.md. It reads the
product (``privacy``, ``split``, ``generation``, ``models``, ``wire``) but no product module imports it.

    settings.py  AuditSettings (what to measure) and Defence        rows.py    AuditRow, AuditReport, score
    run.py       run_audit: the configurations, row by row          table.py   which attacks run for a defence
    state.py     what the configurations share (splits, inverters)  report.py  terminal, markdown and JSON
    attacks/     one module per attack                              prompts.py the prompts, planted secrets
    corpus.py    offline public text                                utility.py a defence's cost
    metrics.py   token accuracy, ROUGE-L, secrets
"""

from lambdasplit.audit.prompts import DEFAULT_PROMPTS, AuditPrompt, load_prompts
from lambdasplit.audit.rows import AuditReport, AuditRow
from lambdasplit.audit.run import run_audit
from lambdasplit.audit.settings import DEFAULT_DEFENCES, AuditSettings, Defence
from lambdasplit.audit.state import Progress

__all__ = [
    "DEFAULT_DEFENCES",
    "DEFAULT_PROMPTS",
    "AuditPrompt",
    "AuditReport",
    "AuditRow",
    "AuditSettings",
    "Defence",
    "Progress",
    "load_prompts",
    "run_audit",
]

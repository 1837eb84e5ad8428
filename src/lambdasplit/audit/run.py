"""``lambdasplit audit``: run the attack suite on a model, per split point and defence, for both attackers.

For each configuration the audit runs real split generations (``intercept``), so what is attacked is
exactly what a wire frame carries; then every attack that applies reads it:

- prompt side (uplink, after the head's X layers): A2 nearest neighbour, A1 exact matching, A3 the learned
  inverter, STIP's distance correlation;
- output side (downlink, before the tail's layers; and the uplink, where generated tokens are fed back):
  B1 tail replay, B2 logit lens, B3 sampled tokens confirmed by the next uplink state, A1 on fed tokens;
- against a key (permutation / rotation): A4 recovers it first, the eavesdropper from the traffic, the
  curious cloud from its own weights, and the attacks above then run on the decoded states.

The eavesdropper holds the public weights and sees the link; the cloud also holds the body (obfuscated,
when a key is used). With no key both see the same states, so one row serves both. TLS leaves the
eavesdropper ciphertext only (``tests/server/test_server_tls.py`` captures it) and changes nothing for the
cloud, where TLS ends.

Each row carries the defence's utility cost, measured through the same split: perplexity on held-out
public text relative to the plain split, and greedy agreement with the unsplit model.

This module plans the configurations and collects the rows; which attacks run against which defence is
``audit.table``, and what the configurations share (loaded splits, cached inverters) is ``audit.state``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace

from lambdasplit.audit import table
from lambdasplit.audit.rows import AuditReport, AuditRow
from lambdasplit.audit.settings import AuditSettings, Defence
from lambdasplit.audit.state import AuditResources, Configuration, Progress
from lambdasplit.config import SplitPoints
from lambdasplit.errors import ConfigError, SplitPointError


def _plan(settings: AuditSettings, num_layers: int) -> list[Configuration]:
    """Prompt-side rows vary X with the tail at its middle value; output-side rows vary the tail with X = 2.

    With ``settings.layers`` ("X:Y"), that one split for both sides.
    """
    if settings.layers is not None:
        try:
            points = SplitPoints.parse(settings.layers, num_layers)
        except SplitPointError as exc:
            raise ConfigError(str(exc)) from None
        return [Configuration(points.head_layers, num_layers - points.body_end, ("prompt", "output"))]
    tail_fixed = sorted(settings.tail_layers)[len(settings.tail_layers) // 2] if settings.tail_layers else 2
    head_fixed = 2 if 2 in settings.head_layers or not settings.head_layers else sorted(settings.head_layers)[0]
    configs: dict[tuple[int, int], set[str]] = {}
    for x in settings.head_layers:
        configs.setdefault((x, tail_fixed), set()).add("prompt")
    for t in settings.tail_layers:
        configs.setdefault((head_fixed, t), set()).add("output")
    for x, t in configs:
        if x + t > num_layers:
            raise ConfigError(f"{x} head + {t} tail layers exceed the model's {num_layers} layers")
    return [Configuration(x, t, tuple(sorted(s, reverse=True))) for (x, t), s in sorted(configs.items())]


def tls_rows(config: Configuration) -> list[AuditRow]:
    """TLS leaves the eavesdropper ciphertext and the cloud what it had (TLS ends there)."""
    out = []
    for side in config.sides:
        out.append(
            AuditRow(
                "tls",
                "eavesdropper",
                side,  # type: ignore[arg-type]
                "any: the link carries TLS records only",
                note="tests/server/test_server_tls.py finds no prompt, token id or hidden-state bytes in a capture",
            )
        )
        out.append(AuditRow("tls", "cloud", side, "as with no defence", note="TLS ends at the cloud: see 'none'"))  # type: ignore[arg-type]
    return out


def run_audit(
    settings: AuditSettings,
    progress: Progress | None = None,
    on_config: Callable[[AuditReport], None] | None = None,
) -> AuditReport:
    """Run every configuration of ``settings``; rows come in the order they are measured.

    ``on_config`` is called with the report so far after each configuration (the CLI writes its files
    then, so an interrupted audit keeps what it measured).
    """
    if not settings.prompts:
        raise ConfigError("the audit needs at least one prompt")
    settings.wire()  # a bad wire dtype fails here, before any model is loaded
    defences = [Defence.parse(d) for d in settings.defences]
    run = AuditResources(settings, progress)
    report = AuditReport(settings={**asdict(settings), "prompts": [asdict(p) for p in settings.prompts]})
    start = time.perf_counter()
    for config in _plan(settings, run.num_layers()):
        public = run.load(config)
        run.stage(f"layers {public.points}: plain split", 0, 1)
        plain_ppl = run.plain_perplexity(public)
        for defence in defences:
            label = f"layers {public.points} · {defence.name}"
            run.stage(label, 0, 1)
            if defence.kind == "tls":  # nothing to run: TLS changes the link, not the states
                report.rows += [replace(r, head_layers=config.head, tail_layers=config.tail) for r in tls_rows(config)]
                continue
            victim, secret = (public, None) if defence.kind == "none" else run.victim(config, defence)
            ratio, agreement = run.utility(victim, plain_ppl)
            context = table.DefenceUnderTest(
                run=run,
                public=public,
                victim=victim,
                secret=secret,
                defence=defence,
                sides=config.sides,
                greedy=run.conversations(victim),
                label=label,
            )
            report.rows += [
                replace(
                    row,
                    perplexity_ratio=ratio,
                    greedy_agreement=agreement,
                    head_layers=config.head,
                    tail_layers=config.tail,
                )
                for row in table.rows(context)
            ]
        report.seconds = time.perf_counter() - start
        if on_config is not None:
            on_config(report)
    return report

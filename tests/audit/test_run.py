"""`lambdasplit audit` end to end on a tiny model: every defence, both attackers, reports written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import PreTrainedModel
from typer.testing import CliRunner

from lambdasplit.audit.prompts import AuditPrompt, load_prompts
from lambdasplit.audit.report import markdown
from lambdasplit.audit.rows import AuditReport, AuditRow
from lambdasplit.audit.run import _plan, run_audit
from lambdasplit.audit.settings import AuditSettings, Defence
from lambdasplit.cli.app import app
from lambdasplit.errors import ConfigError
from lambdasplit.wire import WireDtype

PROMPTS = (
    AuditPrompt("hello world, my password is fox", "fox"),
    AuditPrompt("the quick brown dog jumps over the lazy cloud"),
)


def _find(rows: list[AuditRow], **want: object) -> AuditRow:
    found = [r for r in rows if all(getattr(r, k) == v for k, v in want.items())]
    assert len(found) == 1, (want, [(r.defence, r.attacker, r.side, r.attack) for r in rows])
    return found[0]


@pytest.fixture(scope="module")
def report(tiny_checkpoint: Callable[[str], tuple[Path, PreTrainedModel]]) -> AuditReport:
    path, _ = tiny_checkpoint("llama")
    settings = AuditSettings(
        model=str(path),
        head_layers=(1,),
        tail_layers=(2,),
        defences=("none", "permutation+inner", "rotation", "noise:0.5", "tls"),
        prompts=PROMPTS,
        max_new_tokens=6,
        inverter_tokens=0,
        utility_tokens=256,
        wire_dtype="float32",
    )
    stages: list[str] = []
    report = run_audit(settings, lambda stage, done, total: stages.append(stage))
    assert stages, "the audit reports progress"
    return report


@pytest.fixture(scope="module")
def report_rows(report: AuditReport) -> list[AuditRow]:
    return report.rows


def test_no_defence_the_public_weights_read_everything(report_rows: list[AuditRow]) -> None:
    a1 = _find(report_rows, defence="none", side="prompt", attack="A1 exact matching")
    assert a1.attacker == "eavesdropper = cloud" and a1.token_accuracy == 1.0 and a1.exact_rate == 1.0
    assert a1.secret_rate == 1.0  # the planted secret is in the decoded recovery
    assert a1.user_accuracy == 1.0
    assert _find(report_rows, defence="none", side="output", attack="B1 tail replay").token_accuracy == 1.0
    assert a1.perplexity_ratio == pytest.approx(1.0) and a1.greedy_agreement == 1.0


def test_a_key_stops_the_plain_attacks_until_a4_recovers_it(report_rows: list[AuditRow]) -> None:
    blind = _find(report_rows, defence="rotation", side="prompt", attack="A1 without recovering the key")
    assert blind.token_accuracy is not None and blind.token_accuracy < 0.5
    # ... but norms and inner products survive the rotation: the eavesdropper needs no key at all.
    invariant = _find(report_rows, defence="rotation", side="prompt", attack="A4 invariant matching (no key needed)")
    assert invariant.token_accuracy == 1.0
    for defence in ("permutation+inner", "rotation"):
        cloud = [r for r in report_rows if r.defence == defence and r.attacker == "cloud"]
        assert cloud and all(r.key_accuracy is not None for r in cloud)
        a1 = next(r for r in cloud if r.side == "prompt" and r.attack.endswith("A1 exact matching"))
        assert a1.key_accuracy == 1.0 and a1.token_accuracy == 1.0  # the cloud fits the key from its weights
        assert a1.perplexity_ratio == pytest.approx(1.0, abs=1e-3)  # exact defences cost nothing
    # Inner secrets change only the cloud's weights, so only the cloud is measured for them.
    assert not [r for r in report_rows if r.defence == "permutation+inner" and r.attacker == "eavesdropper"]


def test_noise_costs_utility_and_tls_rows_name_their_evidence(report: AuditReport) -> None:
    report_rows = report.rows
    a2 = _find(report_rows, defence="noise:0.5", side="prompt", attack="A2 nearest neighbour")
    assert a2.perplexity_ratio is not None and a2.perplexity_ratio > 1.0
    tls = [r for r in report_rows if r.defence == "tls"]
    assert {r.attacker for r in tls} == {"eavesdropper", "cloud"} and all(r.note for r in tls)
    text = markdown(report)
    assert "A4 weight matching" in text and "| X=1 | none |" in text


def test_plan_varies_x_and_the_tail_or_audits_one_deployed_split() -> None:
    plan = _plan(AuditSettings(head_layers=(0, 2, 8), tail_layers=(1, 4)), 30)
    assert [(c.head, c.tail, c.sides) for c in plan] == [
        (0, 4, ("prompt",)),  # prompt side: X varies, the tail at its middle value
        (2, 1, ("output",)),  # output side: the tail varies at X = 2
        (2, 4, ("prompt", "output")),
        (8, 4, ("prompt",)),
    ]
    one = _plan(AuditSettings(layers="3:-2"), 30)
    assert [(c.head, c.tail, c.sides) for c in one] == [(3, 2, ("prompt", "output"))]
    with pytest.raises(ConfigError, match="invalid"):
        _plan(AuditSettings(layers="9:4"), 30)


def test_the_wire_dtype_is_checked_before_any_model_loads() -> None:
    assert AuditSettings(wire_dtype="bf16").wire() is WireDtype.BFLOAT16
    for bad in ("int8", "float64"):  # a quantized wire's rounding is not what the attacks' tolerances model
        with pytest.raises(ConfigError, match="float32, float16 or bfloat16"):
            run_audit(AuditSettings(model="no-such-model", prompts=PROMPTS, wire_dtype=bad))


def test_defence_specs_and_prompt_files(tmp_path: Path) -> None:
    assert Defence.parse("noise:0.25").sigma == 0.25
    assert Defence.parse("rotation+inner").inner
    for bad in ("noise:x", "noise:-1", "shuffle", "permutation+outer"):
        with pytest.raises(ConfigError):
            Defence.parse(bad)
    f = tmp_path / "p.jsonl"
    f.write_text('plain line\n{"prompt": "code 1234 here", "secret": "1234"}\n\n')
    assert load_prompts(f) == [AuditPrompt("plain line"), AuditPrompt("code 1234 here", "1234")]
    f.write_text('{"prompt": "no secret here", "secret": "9999"}\n')
    with pytest.raises(ConfigError, match="not in the prompt"):
        load_prompts(f)


def test_cli_writes_json_and_markdown(
    tiny_checkpoint: Callable[[str], tuple[Path, PreTrainedModel]], tmp_path: Path
) -> None:
    path, _ = tiny_checkpoint("qwen2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n")
    out_json, out_md = tmp_path / "a.json", tmp_path / "a.md"
    args = ["audit", "--model", str(path), "--layers", "0:3", "--defence", "none"]
    args += ["--prompts", str(prompts), "-n", "3", "--inverter-tokens", "0", "--json", str(out_json)]
    result = CliRunner().invoke(app, [*args, "--markdown", str(out_md)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out_json.read_text())["rows"]
    assert any(r["attack"] == "A1 exact matching" and r["token_accuracy"] == 1.0 for r in rows)
    assert "| X=0 | none |" in out_md.read_text()
    assert any(r["side"] == "output" and r["tail_layers"] == 2 for r in rows)  # --layers 0:3 of 5: two tail layers
    bad = CliRunner().invoke(app, ["audit", "--model", str(path), "--defence", "shuffle"])
    assert bad.exit_code != 0

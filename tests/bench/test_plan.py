"""The planner (``lambdasplit plan``): its cost model on given inputs, its choice under constraints, the device's
memory against a real split, bytes against real frames, the recorded recovery figures, and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch

import in_process
from lambdasplit.bench.plan import (
    Candidate,
    Constraints,
    Costs,
    LinkSpec,
    Recovery,
    SideCosts,
    Workload,
    grid,
    parse_size,
    predict,
    recommend,
    recommendation_text,
    slow_start_rounds,
    wire_bytes,
)
from lambdasplit.bench.profile import device_parameter_bytes, frame_bytes, kv_cache_bytes
from lambdasplit.bench.recovery import recorded, recovery_for
from lambdasplit.errors import ConfigError
from lambdasplit.split import load_split
from script_modules import load_script

DEVICE = SideCosts(layer_ms=2.0, forward_ms=1.0, layer_prefill_ms=10.0, forward_prefill_ms=3.0, ends_ms=10.0,
                   ends_prefill_ms=20.0)  # fmt: skip
SERVER = SideCosts(layer_ms=1.0, forward_ms=0.5, layer_prefill_ms=5.0, forward_prefill_ms=2.0)
COSTS = Costs(DEVICE, SERVER, overhead_ms=3.0)


def _predict(link: LinkSpec, x: int = 2, t: int = 2, n_new: int = 101) -> Candidate:
    return predict(
        COSTS, link, Workload(41, n_new), num_layers=30, head_layers=x, tail_layers=t, up_bytes=1184,
        down_bytes=1180, prefill_up_bytes=1000, prefill_down_bytes=1000, device_memory_bytes=1,
    )  # fmt: skip


def test_a_step_is_device_plus_server_plus_link() -> None:
    c = _predict(LinkSpec("loopback", 0.0, None, None))
    assert c.device_ms == pytest.approx(10 + 2 * 1 + 4 * 2)  # ends, two forward calls, four layers
    assert c.server_ms == pytest.approx(0.5 + 26 * 1)
    assert c.link_ms == pytest.approx(3.0)  # no RTT, no rate limit: the protocol's own cost
    assert c.step_ms == pytest.approx(20 + 26.5 + 3)
    assert c.prefill_ms == pytest.approx(20 + 2 * 3 + 4 * 10 + 2 + 26 * 5 + 3)
    # 101 tokens: the first from the prefill, 100 decode steps.
    assert c.tokens_per_second == pytest.approx(101 / ((c.prefill_ms + 100 * c.step_ms) / 1e3))
    assert (c.layers, c.body_layers, c.device_layers) == ("2:28", 26, 4)


def test_the_link_adds_its_round_trip_and_the_bytes_at_its_rates() -> None:
    slow = _predict(LinkSpec("wireless", 250.0, 10.0, 10.0))
    # 1184 + 66 and 1180 + 66 bytes (one segment's headers each) at 10 Mbit/s = 1.25 bytes per microsecond.
    assert slow.link_ms == pytest.approx(250 + (1250 + 1246) * 8 / 10e3 + 3)
    assert slow.step_ms - _predict(LinkSpec("loopback", 0.0, None, None)).step_ms == pytest.approx(slow.link_ms - 3)


def test_tcp_slow_start_costs_the_prompt_extra_round_trips() -> None:
    assert slow_start_rounds(1184) == 1
    assert slow_start_rounds(10 * 1448) == 1
    assert slow_start_rounds(10 * 1448 + 1) == 2  # 10 segments, then the 11th in a second round
    assert slow_start_rounds(47264) == 3  # a 41-token float16 prompt of SmolLM2: 33 segments = 10 + 20 + 3
    assert wire_bytes(1448) == 1448 + 66 and wire_bytes(1449) == 1449 + 2 * 66
    c = predict(
        COSTS, LinkSpec("x", 100.0, None, None), Workload(41, 2), num_layers=30, head_layers=1, tail_layers=1,
        up_bytes=1, down_bytes=1, prefill_up_bytes=47264, prefill_down_bytes=1000, device_memory_bytes=1,
    )  # fmt: skip
    no_rtt = predict(
        COSTS, LinkSpec("x", 0.0, None, None), Workload(41, 2), num_layers=30, head_layers=1, tail_layers=1,
        up_bytes=1, down_bytes=1, prefill_up_bytes=47264, prefill_down_bytes=1000, device_memory_bytes=1,
    )  # fmt: skip
    assert c.prefill_ms - no_rtt.prefill_ms == pytest.approx(3 * 100)  # the round trip and two more rounds up


def test_an_empty_body_costs_the_server_nothing_and_impossible_splits_are_refused() -> None:
    c = predict(
        COSTS, LinkSpec("l", 0, None, None), Workload(1, 1), num_layers=4, head_layers=2, tail_layers=2,
        up_bytes=1, down_bytes=1, prefill_up_bytes=1, prefill_down_bytes=1, device_memory_bytes=1,
    )  # fmt: skip
    assert c.server_ms == 0
    with pytest.raises(ConfigError, match="do not fit a model of 4 layers"):
        predict(
            COSTS, LinkSpec("l", 0, None, None), Workload(1, 1), num_layers=4, head_layers=3, tail_layers=2,
            up_bytes=1, down_bytes=1, prefill_up_bytes=1, prefill_down_bytes=1, device_memory_bytes=1,
        )  # fmt: skip
    assert (4, 1) not in grid(5) and (2, 2) in grid(5)  # the cloud keeps a layer
    with pytest.raises(ConfigError, match="rtt"):
        LinkSpec("l", -1, None, None)
    with pytest.raises(ConfigError, match="layer_ms"):
        SideCosts(-1, 0, 0, 0)


def _cand(x: int, t: int, tps: float, mem: int, prompt: float | None = 1.0) -> Candidate:
    return Candidate(x, t, 30 - x - t, 1.0, 1.0, tps, 0, 0, 0, mem, 1184, 1180, Recovery(prompt, "A1", prompt, "B1"))


CANDIDATES = [_cand(1, 1, 10.0, 100), _cand(2, 2, 9.8, 150), _cand(4, 4, 9.0, 200), _cand(8, 4, 6.0, 300)]


def test_the_choice_is_the_most_device_layers_among_the_near_fastest() -> None:
    assert recommend(CANDIDATES, Constraints()).layers == "2:28"  # 9.8 is within 5% of 10.0; 9.0 is not
    assert recommend(CANDIDATES, Constraints(max_device_memory_bytes=120)).layers == "1:29"
    assert recommend(CANDIDATES, Constraints(min_tokens_per_second=5, max_device_memory_bytes=10**6)).layers == "2:28"


def test_lower_audited_recovery_wins_but_a_token_or_two_is_no_evidence() -> None:
    safer = [*CANDIDATES, _cand(8, 1, 5.0, 250, prompt=0.6)]
    assert recommend(safer, Constraints()).layers == "8:29"
    close = [*CANDIDATES[1:], _cand(1, 1, 10.0, 100, prompt=0.997)]  # 1 token of 335: the same 100% band
    assert recommend(close, Constraints()).layers == "2:28"
    unaudited = [_cand(2, 2, 9.8, 150, prompt=None), _cand(8, 1, 5.0, 250, prompt=0.6)]
    assert recommend(unaudited, Constraints()).layers == "8:29"  # not audited is not evidence of privacy


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        (Constraints(min_tokens_per_second=20), "no split reaches --min-tokens-per-second 20: the fastest candidate"),
        (Constraints(max_device_memory_bytes=50), "no split fits --max-device-memory 0.0 MB: the smallest candidate"),
    ],
)
def test_impossible_constraints_say_which_one_binds(constraints: Constraints, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        recommend(CANDIDATES, constraints)
    # Each alone can be met, not both: the fast split is the big one.
    pair = [_cand(1, 1, 10.0, 300 * 10**6), _cand(8, 4, 5.0, 100 * 10**6)]
    with pytest.raises(ConfigError, match=r"exclude each other: splits reaching 9 tokens/s need at least 300.0 MB"):
        recommend(pair, Constraints(min_tokens_per_second=9, max_device_memory_bytes=200 * 10**6))


def test_the_advice_quotes_the_audit_and_claims_no_privacy() -> None:
    text = " ".join(recommendation_text(CANDIDATES[1], CANDIDATES))
    assert "100% of the prompt's tokens (A1)" in text and "100% of the generated tokens (B1)" in text
    assert "No split in this table hides the text" in text
    blank = Candidate(2, 2, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1)
    assert "no recorded audit" in " ".join(recommendation_text(blank, [blank]))


def test_sizes_parse_with_units_and_refuse_nonsense() -> None:
    assert parse_size("200MB") == 200 * 10**6 and parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("300MiB") == 300 * 2**20 and parse_size("4096") == 4096
    for bad in ("", "-1MB", "12 parsecs", "MB"):
        with pytest.raises(ConfigError, match="not understood"):
            parse_size(bad)


@pytest.mark.parametrize("family", ["llama", "mistral"])  # tied embeddings, and an LM head of its own
def test_device_memory_is_the_real_device_parts_parameters(tiny_checkpoint, family: str) -> None:
    path, _ = tiny_checkpoint(family)
    for layers in ("1:4", "0:5", "2:2"):
        split = load_split(path, layers, parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
        params = {p.data_ptr(): p for part in (split.head, split.tail) for p in part.parameters()}
        real = sum(p.numel() * p.element_size() for p in params.values())
        x, y = (int(v) for v in layers.split(":"))
        assert device_parameter_bytes(path, x, y) == real, layers
        assert device_parameter_bytes(path, x, y, "bfloat16") == real // 2


def test_kv_cache_and_frames_match_the_real_things(tiny_checkpoint) -> None:
    path, model = tiny_checkpoint("llama")
    split = load_split(path, "1:4", parts=("head",), device="cpu", dtype="float32", quiet=True)
    assert split.head is not None
    cache = split.head.new_cache()
    with torch.inference_mode():
        split.head(torch.arange(7)[None], cache)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(model.config, 1, 7) == held
    # The socket bytes `bench llm` measured per cached step of SmolLM2 (docs/benchmarks.md): 1,184 up, 1,180 down.
    assert frame_bytes(576, "float16") == (1184, 1180)
    assert frame_bytes(576, "float16", 41)[0] > 41 * 1152


def test_recovery_figures_are_the_recorded_audit_and_nothing_else() -> None:
    from pathlib import Path

    audit = Path(__file__).parents[2] / "docs" / "audit" / "smollm2.json"
    extracted = load_script("plan_recovery").extract(json.loads(audit.read_text()), "docs/audit/smollm2.json")
    assert extracted == recorded()  # the package data is what the script makes from the recorded audit
    r = recovery_for("smollm2-135m-instruct", 8, 4)
    assert r.prompt == 1.0 and r.prompt_attack == "A1 exact matching" and r.output == 1.0
    assert recovery_for("smollm2-135m-instruct", 3, 3) == Recovery()  # not run by the audit
    assert recovery_for("some/other-model", 2, 2) == Recovery()


def test_plan_command_prints_json_and_refuses_impossible_constraints(tiny_checkpoint, capsys, monkeypatch) -> None:
    path, _ = tiny_checkpoint("llama")
    common = ["plan", "--model", str(path), "--new-tokens", "8", "--step-overhead-ms", "1", "--link", "5g", "--json"]
    code, out, err = in_process.lambdasplit(capsys, monkeypatch, *common)
    assert code == 0, err
    plan = json.loads(out)
    layers = [c["layers"] for c in plan["candidates"]]
    assert "1:4" in layers and all(c["head_layers"] + c["tail_layers"] < 5 for c in plan["candidates"])
    assert plan["recommended"] in layers
    first = plan["candidates"][0]
    assert first["step_ms"] > 30 and math.isfinite(first["tokens_per_second"])  # at least 5g's 30 ms round trip
    assert first["recovery"]["prompt"] is None  # no recorded audit for this model: shown as such, not invented
    assert plan["costs"]["device"]["layer_ms"] > 0 and "stand-in" in plan["costs"]["server"]["source"]
    assert "no recorded audit" in " ".join(plan["advice"])

    # Given per-layer costs replace the measured ones (the server's: no stand-in process is started).
    slow = ["--server-layer-ms", "500", "--min-tokens-per-second", "1000"]
    code, out, err = in_process.lambdasplit(capsys, monkeypatch, *common, *slow)
    assert code == 2 and "no split reaches --min-tokens-per-second 1000" in err
    slowed = json.loads(out)
    assert slowed["costs"]["server"]["layer_ms"] == 500 and slowed["costs"]["server"]["source"].startswith("given")
    assert slowed["recommended"] is None and slowed["error"] in err


def test_settings_are_checked_before_anything_is_measured() -> None:
    from lambdasplit.bench.planner import PlanConfig

    for bad, message in ((dict(wire_dtype="bogus"), "wire dtype"), (dict(dtype="int3"), "dtype"),
                         (dict(new_tokens=0), "tokens")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            PlanConfig(**bad)  # type: ignore[arg-type]

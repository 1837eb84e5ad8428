"""scripts/stip_figures.py on a tiny model: STIP's figures come out with the properties STIP claims for them."""

from __future__ import annotations

import pytest

from script_modules import load_script


@pytest.fixture(scope="module")
def result(tiny_checkpoint) -> dict:
    path, _ = tiny_checkpoint("llama")
    script = load_script("stip_figures")
    return script.run(script.parse_args(["--model", str(path), "--quick", "--layers", "0:"]))


def test_the_transformed_split_computes_what_the_plain_model_does(result) -> None:
    rows = {r["transform"]: r for r in result["table5"]}
    assert len(rows) == 2 and all(r["samples"] == 8 for r in rows.values())
    for r in rows.values():
        assert r["max_abs_diff"] < 1e-4 and r["sum_abs_diff_mean"] < 1e-2  # ~0: float rounding only
        assert r["top1_agreement"] == 1.0


def test_distance_correlations_lie_in_the_unit_interval_for_every_transform(result) -> None:
    for part in ("fig6a", "fig6b"):
        rows = result[part]["rows"]
        assert {r["transform"] for r in rows} >= {"random projection", "rotation"}
        assert all(0.0 <= r["dcor"] <= 1.0 + 1e-9 for r in rows)
    # Samples = tokens: a permutation of the hidden dimension keeps every distance, so dCor is 1 (STIP's low
    # figure comes from taking the hidden dimensions as the samples).
    perm = [r for r in result["fig6b"]["rows"] if r["transform"].startswith("permutation") and r["axis"] == "rows"]
    assert perm and all(r["dcor"] == pytest.approx(1.0) for r in perm)


def test_without_the_key_the_transformed_body_generates_something_else(result) -> None:
    rows = result["table4"]
    for name in ("permutation + ffn+kv-heads+v-channels+qk-planes", "rotation"):
        assert all(r[f"{name} with key"] == r["plain"] for r in rows)
        assert any(r[f"{name} without key"] != r["plain"] for r in rows)


def test_throughput_runs_generate_the_plain_models_tokens(result) -> None:
    assert result["throughput"][0]["run"] == "plain"
    assert all(r["same_tokens_as_plain"] and r["tokens_per_s_best"] > 0 for r in result["throughput"])

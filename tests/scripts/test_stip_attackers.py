"""scripts/stip_attackers.py on a tiny model: T1 reads everything, T2 reads more with more traffic, T3 is measured."""

from __future__ import annotations

import math
from types import ModuleType

import pytest

from script_modules import load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("stip_attackers")


@pytest.fixture(scope="module")
def result(tiny_checkpoint, script) -> dict:
    path, _ = tiny_checkpoint("llama")
    return script.run(script.parse_args(["--model", str(path), "--quick"]))


def test_t1_recovers_the_key_and_every_prompt_token(result) -> None:
    t1 = result["t1"]
    assert t1["key_accuracy"] == 1.0
    assert t1["a1_exact_matching"] == 1.0 and t1["prompt_tokens"] > 50


def test_t2_reads_more_of_the_uplink_with_more_traffic(result) -> None:
    uplink = [r for r in result["t2"]["rows"] if r["side"].startswith("prompt")]
    assert [r["traffic_tokens"] for r in uplink] == [300, 3000]
    little, much = uplink
    assert much["bigram decipherment"] > little["bigram decipherment"] + 0.2
    assert much["bigram decipherment"] > much["unigram rank"]
    assert much["bigram decipherment"] > 0.5  # the tiny tokenizer's ~100 codes: a small cipher, mostly read
    downlink = [r for r in result["t2"]["rows"] if r["side"].startswith("output")]
    assert downlink and all(0.0 <= r["bigram decipherment"] <= 1.0 for r in downlink)


def test_t3_measures_drift_utility_and_attacks_per_fine_tune(result) -> None:
    rows = result["t3"]
    assert [r["method"] for r in rows] == ["lora", "full"]
    for r in rows:
        assert r["median_matrix_change"] > 0 and math.isfinite(r["perplexity_after"])
        assert 0.0 <= r["key_accuracy"] <= 1.0
        assert 0.0 <= r["a1_exact_matching"] <= 1.0 and 0.0 <= r["a2_nearest_neighbour"] <= 1.0
    assert rows[0]["embedding_change"] == 0.0  # LoRA leaves the embedding alone
    assert rows[1]["embedding_change"] > 0.0


def test_the_table_and_the_curve_are_written(result, script, tmp_path) -> None:
    table = script.markdown(result)
    assert all(f"| {t} |" in table for t in ("T1", "T2", "T3"))
    assert "10%" in table
    png = tmp_path / "curve.png"
    script.plot(result, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smallest_protecting_fine_tune(script) -> None:
    rows = [
        {"median_matrix_change": 0.1, "a1_exact_matching": 0.5, "a2_nearest_neighbour": 0.05},
        {"median_matrix_change": 0.3, "a1_exact_matching": 0.05, "a2_nearest_neighbour": 0.09},
        {"median_matrix_change": 0.2, "a1_exact_matching": 0.01, "a2_nearest_neighbour": 0.02},
    ]
    assert script.smallest_protecting(rows)["median_matrix_change"] == 0.2
    assert script.smallest_protecting(rows[:1]) is None


def test_extend_appends_t3_points_to_an_earlier_result(tiny_checkpoint, result, script, tmp_path) -> None:
    import json

    path, _ = tiny_checkpoint("llama")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(result, default=str))
    args = script.parse_args(["--model", str(path), "--quick", "--extend", str(earlier), "--tune", "lora:2:1e-2:2"])
    extended = script.run(args)
    assert [r["fine-tune"] for r in extended["t3"]] == [
        *(r["fine-tune"] for r in result["t3"]),
        "LoRA r=2, lr 1e-2, 2 steps",
    ]
    assert extended["t1"] == json.loads(json.dumps(result["t1"], default=str))  # T1 and T2 kept, not rerun
    assert extended["t3"][-1]["steps"] == 2 and extended["t3"][-1]["median_matrix_change"] > 0
    with pytest.raises(SystemExit):
        script.parse_args(["--tune", "lora:eight:1e-3:10"])
    with pytest.raises(SystemExit):
        script.parse_args(["--extend", str(earlier)])  # nothing to add

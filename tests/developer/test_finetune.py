"""``lambdasplit developer finetune``: a private model from a tiny base, checked against what it claims.

The fine-tuned folder must be a plain checkpoint the split cuts exactly, its held-out perplexity must fall
on text the base has never seen, and ``finetune.json``'s drift figures must be the drift of the saved
weights, recomputed here from the two checkpoints' files.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lambdasplit.cli.app import app
from lambdasplit.developer import REPORT_FILE, FinetuneReport, FinetuneSettings, finetune, relative_change
from lambdasplit.errors import ConfigError
from lambdasplit.generation import generate
from lambdasplit.split import load_split

# Ten sentence patterns the tiny tokenizer knows, varied by a counter: repetitive enough that a few steps
# teach it, and every held-out paragraph differs from every training one.
_WORDS = ["fox", "dog", "world", "capital", "device", "cloud", "prompt", "tokenizer", "hidden", "states"]
PROMPT = "the quick brown fox"
QUICK = FinetuneSettings(steps=25, seq_len=32, batch_size=4, lr=1e-2, held_out=0.2, seed=0)


def write_text(path: Path, paragraphs: int = 40) -> Path:
    lines = []
    for i in range(paragraphs):
        a, b = _WORDS[i % 10], _WORDS[(3 * i + 1) % 10]
        lines.append(f"the quick brown {a} jumps over the lazy {b}. hello {a}, this is the {b} of France.")
    path.write_text("\n\n".join(lines) + "\n")
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny models' matrices are too small to share between threads; with two, every step waits on OpenMP
    synchronisation, which on a busy machine (spinning idle threads) made these tests 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "private.txt")


@pytest.fixture(scope="module")
def lora(
    tiny_checkpoint, text_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, FinetuneReport]:
    base, _ = tiny_checkpoint("llama")
    out = tmp_path_factory.mktemp("lora") / "private-model"
    return base, out, finetune(base, text_file, QUICK, out=out)


def test_lora_lowers_heldout_perplexity(lora) -> None:
    _, _, report = lora
    assert report.perplexity_after < 0.5 * report.perplexity_before, (report.perplexity_before, report.perplexity_after)
    assert report.steps == len(report.losses) == QUICK.steps
    assert report.train_tokens % QUICK.seq_len == 0 and report.heldout_tokens % QUICK.seq_len == 0
    assert report.documents == {"train": 32, "heldout": 8}  # 20% of 40 paragraphs


def test_the_folder_splits_exactly_like_the_merged_model(lora) -> None:
    _, out, _ = lora
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
    split = load_split(out, "2:4", device="cpu", dtype="float32")
    ids = split.tokenizer(PROMPT).input_ids
    result = generate(split, ids, max_new_tokens=12, ignore_eos=True)
    with torch.no_grad():
        expected = merged.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert result.token_ids == expected[0, len(ids) :].tolist()


def test_report_records_the_drift_of_the_saved_weights(lora) -> None:
    base, out, report = lora
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved == json.loads(json.dumps(report.to_json()))
    for key in ("method", "lr", "rank", "alpha", "dropout", "target_modules", "seq_len", "batch_size", "seed"):
        assert key in saved["settings"], key
    for key in ("steps", "train_seconds", "train_tokens", "heldout_tokens", "perplexity_before", "perplexity_after"):
        assert key in saved, key
    assert saved["settings"]["method"] == "lora" and saved["settings"]["lr"] == QUICK.lr
    before, after = weights(base), weights(out)
    assert after.keys() <= before.keys() and "lm_head.weight" not in after  # the tied head is stored once
    recomputed = relative_change({k: before[k] for k in after}, after)
    assert saved["relative_change"] == recomputed  # exact: the figures are those of the files
    adapted = set(saved["trained"])
    assert len(adapted) == 7 * 5  # q, k, v, o, gate, up, down in each of the 5 layers
    assert all(saved["relative_change"][name] > 0 for name in adapted)
    untouched = set(after) - adapted
    assert "model.embed_tokens.weight" in untouched and "model.norm.weight" in untouched
    assert all(saved["relative_change"][name] == 0.0 for name in untouched)
    assert all(torch.equal(before[name], after[name]) for name in untouched)
    values = [saved["relative_change"][n] for n in adapted]
    assert saved["relative_change_max"] == max(values)
    assert math.isclose(saved["relative_change_mean"], sum(values) / len(values))


def test_full_changes_every_tensor_and_keeps_the_embeddings_tied(tiny_checkpoint, text_file, tmp_path) -> None:
    base, _ = tiny_checkpoint("llama")
    settings = FinetuneSettings(method="full", steps=3, seq_len=32, batch_size=2, lr=1e-3)
    report = finetune(base, text_file, settings, out=tmp_path / "full")
    assert report.trained == list(report.relative_change)
    assert all(v is not None and v > 0 for v in report.relative_change.values())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert not torch.equal(merged.model.embed_tokens.weight, weights(base)["model.embed_tokens.weight"])


def test_lora_on_qwen2_leaves_its_untied_head_and_biases(tiny_checkpoint, text_file, tmp_path) -> None:
    base, _ = tiny_checkpoint("qwen2")
    report = finetune(base, text_file, FinetuneSettings(steps=3, seq_len=32, lr=1e-2), out=tmp_path / "q")
    assert not report.tied_embeddings and report.relative_change["lm_head.weight"] == 0.0
    biases = [n for n in report.relative_change if n.endswith(".bias")]
    assert biases and all(report.relative_change[n] in (0.0, None) for n in biases)  # None: a bias of zeros
    split = load_split(tmp_path / "q", "1:4", device="cpu", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    ids = [1, 17, 42, 99, 7]
    with torch.no_grad():
        expected = merged.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generate(split, ids, max_new_tokens=8, ignore_eos=True).token_ids == expected[0, 5:].tolist()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "qlora"}, "method must be one of lora, full, got 'qlora'"),
        ({"rank": 0}, "rank must be an integer >= 1, got 0"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"held_out": 1.0}, "held_out must be a fraction in (0, 1), got 1.0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"target_modules": ()}, "target_modules must be a non-empty tuple"),
    ],
)
def test_bad_settings_name_the_value_and_what_is_allowed(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FinetuneSettings(**fields)  # type: ignore[arg-type]


def test_bad_text_and_targets_are_refused_before_training(tiny_checkpoint, tmp_path) -> None:
    base, _ = tiny_checkpoint("llama")
    with pytest.raises(ConfigError, match="does not exist"):
        finetune(base, tmp_path / "missing.txt", QUICK, out=tmp_path / "o")
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(ConfigError, match="is empty"):
        finetune(base, tmp_path / "empty.txt", QUICK, out=tmp_path / "o")
    (tmp_path / "short.txt").write_text("hello world\n\nthe quick brown fox\n")
    with pytest.raises(ConfigError, match=r"too short for seq_len=32: 0 training and 0 held-out blocks"):
        finetune(base, tmp_path / "short.txt", QUICK, out=tmp_path / "o")
    with pytest.raises(ConfigError, match="target modules \\['qkv_proj'\\] are not linear layers"):
        finetune(
            base,
            write_text(tmp_path / "t.txt"),
            FinetuneSettings(target_modules=("qkv_proj",), seq_len=32),
            out=tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


def test_a_full_output_folder_is_kept_unless_overwriting(tiny_checkpoint, text_file, tmp_path) -> None:
    base, _ = tiny_checkpoint("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    one_step = FinetuneSettings(steps=1, seq_len=32)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        finetune(base, text_file, one_step, out=out)
    assert (out / "precious.txt").read_text() == "keep me"
    finetune(base, text_file, one_step, out=out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / REPORT_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


def test_lora_without_peft_says_how_to_install_it(tiny_checkpoint, text_file, tmp_path, monkeypatch) -> None:
    base, _ = tiny_checkpoint("llama")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'lambdasplit\[developer\]'"):
        finetune(base, text_file, FinetuneSettings(steps=1, seq_len=32), out=tmp_path / "o")


def test_cli_finetunes_and_prints_perplexity_and_where(tiny_checkpoint, text_file, tmp_path) -> None:
    base, _ = tiny_checkpoint("llama")
    out = tmp_path / "cli-model"
    args = ["developer", "finetune", str(base), "--text", str(text_file), "--out", str(out)]
    args += ["--steps", "4", "--seq-len", "32", "--lr", "0.01", "--rank", "4", "--held-out", "0.2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / REPORT_FILE).read_text())
    assert f"held-out perplexity {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f}" in result.stdout
    assert str(out) in result.stdout
    assert report["settings"]["rank"] == 4 and report["steps"] == 4
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, ConfigError) and "--force" in str(again.exception)
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0

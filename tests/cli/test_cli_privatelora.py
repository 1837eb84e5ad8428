"""`lambdasplit serve --privatelora` as a process, `personalize` training a device's adapters against it, and
`generate --privatelora` giving the tokens of the model with those adapters merged; options checked first."""

from __future__ import annotations

import copy
import json
import subprocess

import torch
from transformers import AutoTokenizer

from lambdasplit.privatelora import PrivateAdapters, merge_into
from lambdasplit.server.process import body_server_process

TEXT = "\n\n".join(
    f"Private note {i}: the quick brown fox {i} jumps over the lazy dog and the cat sleeps on mat {i}."
    for i in range(12)
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["lambdasplit", *args], capture_output=True, text=True, timeout=300)


def test_personalize_then_generate_against_a_privatelora_server(tiny_checkpoint, tmp_path) -> None:
    path, reference = tiny_checkpoint("llama")
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    out = tmp_path / "m.safetensors"
    args = ["--privatelora", "--model", str(path), "--adapter-rank", "8/4", "--adapter-seed", "3"]
    with body_server_process(args, timeout=120) as url:
        trained = run(
            "personalize", str(text), "--cloud", url, "--out", str(out), "--model", str(path),
            "--epochs", "3", "--seq-len", "16", "--lr", "1e-2",
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert "adapters written to" in trained.stderr and "round trips" in trained.stderr
        first, last = (float(x) for x in trained.stderr.split("loss ")[-1].split(" over")[0].split(" -> "))
        assert last < first
        generated = run(
            "generate", "the quick brown", "--model", str(path), "--cloud", url, "--privatelora", str(out),
            "-n", "5", "--json", "--wire-dtype", "float32",
        )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    result = json.loads(generated.stdout)
    assert result["mode"] == "privatelora" and result["privatelora"]["exchanges"] > 0
    adapters = PrivateAdapters.load(out)
    assert adapters.layout.rank_c2d == 8 and adapters.layout.rank_d2c == 4 and adapters.layers == list(range(5))
    assert any(float(p.detach().abs().max()) > 0 for p in adapters.parameters())  # trained, not left at zero
    merged = merge_into(copy.deepcopy(reference), adapters)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = torch.tensor([tokenizer("the quick brown", add_special_tokens=False).input_ids])
    with torch.no_grad():
        want = merged.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, prompt.shape[1] :]
    assert result["token_ids"] == want.tolist()


def test_privatelora_options_are_checked_before_loading(tmp_path) -> None:
    res = run("serve", "--privatelora", "--share", "0")
    assert res.returncode != 0 and "--privatelora" in res.stderr
    res = run("serve", "--privatelora", "--adapter-rank", "0")
    assert res.returncode != 0 and "1 .. 1024" in res.stderr
    res = run("generate", "hi", "--privatelora", str(tmp_path / "m.safetensors"))
    assert res.returncode != 0 and "--cloud URL" in res.stderr

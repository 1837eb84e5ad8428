"""`lambdasplit serve --privatelora` as a process, `personalize` training a device's adapters against it, and
`generate --privatelora` giving the tokens of the model with those adapters merged; options checked first.

Each start of the console script costs seconds of imports, so `personalize`, `generate` and all but one of the option
checks go through the same entry point in this process (in_process.lambdasplit): the same arguments, exit code and
output; the server stays a process.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

import in_process
from lambdasplit.errors import RemoteError
from lambdasplit.privatelora import AdapterLink, PrivateAdapters, merge_into
from lambdasplit.server.process import body_server_process
from lambdasplit.server.run import READY
from lambdasplit.split import load_split

TEXT = "\n\n".join(
    f"Private note {i}: the quick brown fox {i} jumps over the lazy dog and the cat sleeps on mat {i}."
    for i in range(12)
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["lambdasplit", *args], capture_output=True, text=True, timeout=300)


def test_personalize_then_generate_against_a_privatelora_server(
    tiny_checkpoint, tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, reference = tiny_checkpoint("llama")
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    out = tmp_path / "m.safetensors"
    args = ["--privatelora", "--model", str(path), "--adapter-rank", "8/4", "--adapter-seed", "3"]
    monkeypatch.delenv("LAMBDASPLIT_TOKEN", raising=False)
    with body_server_process(args, token="sekrit", timeout=120) as url:
        personalize = ["personalize", str(text), "--cloud", url, "--out", str(out), "--model", str(path)]
        code, _, err = in_process.lambdasplit(capsys, monkeypatch, *personalize, "--token", "guess")
        assert code != 0 and "unauthorized" in err and "refused the bearer token" in err, err
        code, _, err = in_process.lambdasplit(
            capsys, monkeypatch, *personalize, "--epochs", "3", "--seq-len", "16", "--lr", "1e-2", "--token", "sekrit"
        )
        assert code == 0, err
        assert "adapters written to" in err and "round trips" in err
        first, last = (float(x) for x in err.split("loss ")[-1].split(" over")[0].split(" -> "))
        assert last < first
        code, stdout, err = in_process.lambdasplit(
            capsys, monkeypatch, "generate", "the quick brown", "--model", str(path), "--cloud", url,
            "--privatelora", str(out), "-n", "5", "--json", "--wire-dtype", "float32", "--token", "sekrit",
        )  # fmt: skip
        assert code == 0, err
        code, _, err = in_process.lambdasplit(
            capsys, monkeypatch, "generate", "the quick brown", "--model", str(path), "--cloud", url,
            "--privatelora", str(out), "-n", "5",
        )  # fmt: skip
        assert code != 0 and "needs a bearer token" in err, err
    result = json.loads(stdout)
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


def test_privatelora_options_are_checked_before_loading(
    tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    res = run("serve", "--privatelora", "--share", "0")  # the console script itself
    assert res.returncode != 0 and "--privatelora" in res.stderr
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, "serve", "--privatelora", "--adapter-rank", "0")
    assert code != 0 and "1 .. 1024" in err
    code, _, err = in_process.lambdasplit(
        capsys, monkeypatch, "generate", "hi", "--privatelora", str(tmp_path / "m.safetensors")
    )
    assert code != 0 and "--cloud URL" in err


def test_sigterm_drains_the_server_then_it_exits(tiny_checkpoint) -> None:
    """A rolling restart of `serve --privatelora`: on SIGTERM a newcomer is refused (`draining`), the session in
    progress is still served, and the process exits once it has ended, well before the drain's deadline."""
    path, _ = tiny_checkpoint("llama")
    argv = ["serve", "--privatelora", "--model", str(path), "--port", "0", "--drain-seconds", "60"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lambdasplit.cli import main; main()", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        url = next(line for line in proc.stdout if line.startswith(READY)).removeprefix(READY).split()[0]
        device = load_split(path, "0:5", parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
        hidden = device.head(torch.tensor([[4, 5, 6]]))
        with AdapterLink(url, timeout=30) as link:
            first = link.forward(hidden, 0)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while True:  # the signal is handled between the server's own steps: wait until it refuses
                try:
                    AdapterLink(url, timeout=30).close()
                except RemoteError as refused:
                    assert refused.code == "draining"
                    break
                assert time.monotonic() < deadline, "the server never started draining"
                time.sleep(0.1)
            assert proc.poll() is None  # a session is still open: it waits
            torch.testing.assert_close(link.forward(hidden, 0, reset=True), first)  # still served, the same
        started = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 20
        reader.join(10)
        assert "drained: no session open" in "".join(err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

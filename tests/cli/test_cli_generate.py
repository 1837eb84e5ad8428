"""The `lambdasplit` command line, run as users run it (the installed console script).

Each start of the console script costs seconds (importing torch and transformers), so checks that need many runs
of one command go through the same entry point in this process (in_process.lambdasplit): the same arguments, exit
code and error line; one case of each stays a real process.
"""

from __future__ import annotations

import json
import subprocess

import pytest

import in_process


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["lambdasplit", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    return str(path)


def test_generate_json_has_the_promised_fields_and_equals_unsplit(tiny, capsys, monkeypatch) -> None:
    common = ["generate", "hello world", "--model", tiny, "-n", "12", "--json"]
    split = run(*common, "--layers", "1:4")
    assert split.returncode == 0, split.stderr
    out = json.loads(split.stdout)
    for key in ("text", "token_ids", "new_tokens", "seconds", "tokens_per_second", "layers"):
        assert key in out, key
    assert out["layers"] == {"head": [0, 1], "body": [1, 4], "tail": [4, 5]}
    assert out["new_tokens"] == len(out["token_ids"]) > 0
    assert out["traffic"]["up_bytes"] > 0
    code, stdout, err = in_process.lambdasplit(capsys, monkeypatch, *common, "--unsplit")  # split above: a process
    assert code == 0, err
    unsplit = json.loads(stdout)
    assert unsplit["token_ids"] == out["token_ids"]
    assert unsplit["traffic"]["up_bytes"] == 0


def test_generate_speculative_gives_the_same_tokens_in_fewer_steps(tiny, capsys, monkeypatch) -> None:
    # A prompt that repeats itself, so prompt lookup finds drafts on this random tiny model.
    common = ["generate", "the quick brown fox " * 6, "--model", tiny, "-n", "24", "--json", "--layers", "1:4"]
    code, stdout, err = in_process.lambdasplit(capsys, monkeypatch, *common)
    assert code == 0, err
    plain = json.loads(stdout)
    for drafter in ("lookup", "self", f"model:{tiny}"):
        code, stdout, err = in_process.lambdasplit(
            capsys, monkeypatch, *common, "--speculative", drafter, "--draft-tokens", "3"
        )
        assert code == 0, err
        out = json.loads(stdout)
        assert out["token_ids"] == plain["token_ids"], drafter
        assert out["steps"] <= plain["steps"]
    assert out["acceptance_rate"] == 1.0 and out["steps"] < plain["steps"]  # the model drafting for itself
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, *common, "--speculative", "lookup", "--no-cache")
    assert code == 2 and "--no-cache" in err
    res = run(*common, "--speculative", "psychic")  # the console script itself: one line, exit 2
    assert res.returncode == 2 and "unknown drafter" in res.stderr
    assert "Traceback" not in res.stderr


def test_generate_streams_text_and_prints_a_summary(tiny, capsys, monkeypatch) -> None:
    # In this process: the console script's generate runs as a process in the test above.
    code, _, err = in_process.lambdasplit(
        capsys, monkeypatch, "generate", "hello", "--model", tiny, "-n", "5", "--chat", "--layers", "2:3"
    )
    assert code == 0, err
    assert "layers 2:3 of 5" in err and "tok/s" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "4:2"], "0 <= X <= Y <= N"),
        (["--model", "/nonexistent/model"], "not found"),
        (["--dtype", "int3"], "float32, float16, bfloat16"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--greedy", "--temperature", "0.8"], "--greedy means --temperature 0"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tiny, capsys, monkeypatch, args: list[str], message: str) -> None:
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, "generate", "hi", "--model", tiny, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_verify_reports_exact(tiny) -> None:
    res = run("verify", "--model", tiny, "--layers", "1:3", "--steps", "5")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exact within tolerance" in res.stdout


def test_chat_keeps_history_and_resets(tiny) -> None:
    res = subprocess.run(
        ["lambdasplit", "chat", "--model", tiny, "--layers", "1:4", "-n", "6"],
        input="hello world\nthe quick brown fox\n/reset\nhi\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("model:") == 3
    assert "conversation forgotten" in res.stdout
    assert "tok/s" in res.stdout


@pytest.mark.smollm2
def test_demo_runs_the_main_job_over_loopback() -> None:
    res = run("demo", "-n", "8")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "listening on ws://127.0.0.1:" in out
    assert "Λ-Split over a real loopback connection" in out
    assert "1,176 B per token" in out  # float16 decode step: 24-byte header + 576 x 2 bytes
    assert "ce 9b 01 05" in out  # the frame an eavesdropper sees: magic, version, FORWARD

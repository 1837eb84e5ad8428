"""`generate`'s sampling options mean one thing each: greedy by default, --greedy explicit, sampling only with a
temperature above 0. Run in process (typer's CliRunner), with the SamplingParams each run used recorded."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import lambdasplit.cli.generate as generate_command
from lambdasplit.cli.app import app
from lambdasplit.errors import ConfigError
from lambdasplit.generation import SamplingParams
from lambdasplit.split import load_split

N = 8
PROMPT = "hello world"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> tuple[str, Any]:
    path, ref = tiny_checkpoint("llama")
    return str(path), ref


@pytest.fixture
def used(monkeypatch: pytest.MonkeyPatch) -> list[SamplingParams]:
    """The SamplingParams of every generation the command starts."""
    seen: list[SamplingParams] = []
    real = generate_command.stream

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["params"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_command, "stream", recording)
    return seen


def run(tiny: tuple[str, Any], *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["generate", PROMPT, "--model", tiny[0], "-n", str(N), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_default_is_greedy_and_equals_the_unsplit_argmax(tiny, used) -> None:
    out = run(tiny, "--layers", "1:4")
    assert used[-1].temperature == 0 and used[-1].greedy
    split = load_split(tiny[0], "1:4", parts=["head", "tail"], device="cpu", dtype="float32")
    prompt = split.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        ids = tiny[1].generate(
            torch.tensor([prompt]), max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = ids[0, len(prompt) :].tolist()
    tokens = out["token_ids"]
    assert tokens == expected[: len(tokens)]
    if len(tokens) < N:  # it stopped at an end-of-sequence token, which the result leaves out
        assert out["finish_reason"] == "eos" and expected[len(tokens)] in split.eos_token_ids()


def test_greedy_flag_is_greedy_and_the_same_as_temperature_zero(tiny, used) -> None:
    default = run(tiny)
    greedy = run(tiny, "--greedy")
    zero = run(tiny, "--temperature", "0")
    assert [p.temperature for p in used] == [0.0, 0.0, 0.0]
    assert greedy["token_ids"] == default["token_ids"] == zero["token_ids"]


def test_temperature_with_a_seed_samples_reproducibly(tiny, used) -> None:
    greedy = run(tiny)
    sampled = run(tiny, "--temperature", "0.8", "--seed", "1")
    again = run(tiny, "--temperature", "0.8", "--seed", "1")
    assert (used[-1].temperature, used[-1].seed) == (0.8, 1) and not used[-1].greedy
    assert sampled["token_ids"] == again["token_ids"]
    # A random tiny model's distribution is nearly flat: eight sampled tokens all equal to the argmax would be
    # a coincidence of about (1/2)^8 at the very least.
    assert sampled["token_ids"] != greedy["token_ids"]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--greedy", "--temperature", "0.8"], ["--greedy", "--temperature 0.8"]),
        (["--top-k", "5"], ["--top-k", "--temperature"]),
        (["--top-p", "0.9", "--seed", "3"], ["--top-p, --seed", "--temperature"]),
    ],
)
def test_contradicting_or_ignored_sampling_options_are_refused_before_loading(
    tiny, used, args: list[str], names: list[str]
) -> None:
    result = CliRunner().invoke(app, ["generate", PROMPT, "--model", "/nonexistent/model", *args])
    assert isinstance(result.exception, ConfigError), result.output
    for name in names:
        assert name in str(result.exception)
    assert used == []


def test_help_says_what_the_sampling_options_mean() -> None:
    result = CliRunner().invoke(app, ["generate", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())  # rich's option table, unwrapped
    assert "--greedy" in text and "--temperature" in text
    assert "0 = greedy, the default" in text

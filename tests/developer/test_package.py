"""`lambdasplit developer package`, then `serve` on the server bundle and `generate` on a user bundle."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lambdasplit.cli.app import app
from lambdasplit.generation import generate
from lambdasplit.split import load_split
from servers import body_server


def test_package_serve_and_generate_from_the_command_line(tiny_checkpoint, tmp_path) -> None:
    private, _ = tiny_checkpoint("llama")
    server_out, user_out = tmp_path / "server", tmp_path / "users"
    argv = ["developer", "package", str(private), "--layers", "1:4", "--server-out", str(server_out)]
    result = CliRunner().invoke(app, [*argv, "--user-out", str(user_out), "--groups", "2"])
    assert result.exit_code == 0, result.output
    assert "user bundle of group g1" in result.output and f"lambdasplit serve --model {server_out}" in result.output
    again = CliRunner().invoke(app, [*argv, "--user-out", str(user_out)])
    assert again.exit_code != 0 and "exists and is not empty" in str(again.exception)
    expected = generate(load_split(private, "1:4"), "hello world", max_new_tokens=8).token_ids
    with body_server("--model", str(server_out)) as url:
        for group in ("g0", "g1"):
            run = ["generate", "hello world", "-n", "8", "--json", "--wire-dtype", "float32"]
            out = CliRunner().invoke(app, [*run, "--model", str(user_out / group), "--cloud", url])
            assert out.exit_code == 0, out.output
            assert json.loads(out.stdout)["token_ids"] == expected, group


def test_stip_layout_from_the_command_line(tiny_checkpoint, tmp_path) -> None:
    private, _ = tiny_checkpoint("qwen2")
    server_out, user_out = tmp_path / "server", tmp_path / "users"
    argv = ["developer", "package", str(private), "--server-out", str(server_out), "--user-out", str(user_out)]
    result = CliRunner().invoke(app, [*argv, "--layout", "stip"])
    assert result.exit_code == 0, result.output
    assert "server bundle (layers 0:5)" in result.output
    bad = CliRunner().invoke(app, [*argv, "--layout", "tail-only", "--force"])
    assert bad.exit_code != 0 and "--layout is head-tail or stip" in bad.output
    expected = generate(load_split(private, "0:"), "hello world", max_new_tokens=8).token_ids
    with body_server("--model", str(server_out)) as url:
        run = ["generate", "hello world", "-n", "8", "--json", "--wire-dtype", "float32"]
        out = CliRunner().invoke(app, [*run, "--model", str(user_out / "g0"), "--cloud", url])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["token_ids"] == expected

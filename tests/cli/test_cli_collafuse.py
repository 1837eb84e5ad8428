"""``lambdasplit collafuse server|client`` as processes, and their option checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lambdasplit.cli.app import app
from lambdasplit.diffusion.pipeline import load_pipeline
from lambdasplit.server.process import lambdasplit_process
from lambdasplit.server.run import READY


def test_a_server_and_a_client_train_as_processes(tmp_path: Path) -> None:
    server_args = [
        "collafuse", "server", "--clients", "1", "--rounds", "2", "--batch", "4", "--cut-ratio", "0.5",
        "--port", "0", "--out", str(tmp_path / "server"), "--no-progress",
    ]  # fmt: skip
    with lambdasplit_process(server_args, READY, token="sekrit", timeout=120) as ready:
        url = ready.split()[0]
        client = [
            sys.executable, "-c", "from lambdasplit.cli import main; main()", "collafuse", "client", "--server", url,
            "--client", "0", "--clients", "3", "--images", "8", "--out", str(tmp_path / "client"),
            "--report", str(tmp_path / "client.json"), "--no-progress",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "LAMBDASPLIT_TOKEN"}
        intruder = subprocess.run([*client, "--token", "guess"], capture_output=True, text=True, timeout=180, env=env)
        assert intruder.returncode != 0 and "refused the bearer token" in intruder.stderr, intruder.stderr[-3000:]
        done = subprocess.run([*client, "--token", "sekrit"], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "client.json").read_text())
    assert report["rounds"] == 2 and report["handoff"] == 500 and report["rows_sent"] + report["rows_local"] == 8
    assert report["bytes_sent"] > 0 and report["cpu_seconds_per_step"] > 0
    assert "--policy collafuse --cut-ratio 0.5" in done.stderr
    for side in ("server", "client"):
        assert load_pipeline(tmp_path / side / "pipeline").unet is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["server", "--clients", "1", "--rounds", "1", "--out", "x", "--host", "0.0.0.0"], "without TLS"),
        (["server", "--clients", "1", "--rounds", "1", "--out", "x", "--tls-cert", "c.pem"], "go together"),
        (["server", "--clients", "1", "--rounds", "1", "--out", "x", "--cut-ratio", "1.5"], "cut-ratio"),
        (["client", "--server", "ws://127.0.0.1:1", "--client", "3", "--clients", "3", "--out", "x"], "below"),
        (["client", "--server", "ws://10.0.0.1:1", "--client", "0", "--clients", "3", "--out", "x"], "ws://"),
    ],
)
def test_bad_options_are_refused_with_a_reason(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["collafuse", *args])
    assert result.exit_code != 0
    text = result.output + (str(result.exception) if result.exception else "")
    assert message in text


def test_sigterm_stops_the_server_after_its_round_with_a_checkpoint_on_both_sides(tmp_path: Path) -> None:
    """A preempted training server: SIGTERM mid-training ends both processes cleanly (exit 0), each with a
    checkpoint at the same round and the way to resume."""
    server = subprocess.Popen(
        [sys.executable, "-c", "from lambdasplit.cli import main; main()", "collafuse", "server", "--clients", "1",
         "--rounds", "1000", "--batch", "4", "--cut-ratio", "0.5", "--port", "0", "--out", str(tmp_path / "server"),
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    client: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        url = next(line for line in server.stdout if line.startswith(READY)).removeprefix(READY).split()[0]
        client = subprocess.Popen(
            [sys.executable, "-c", "from lambdasplit.cli import main; main()", "collafuse", "client", "--server", url,
             "--client", "0", "--clients", "1", "--images", "8", "--out", str(tmp_path / "client"),
             "--checkpoint-every", "2", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (tmp_path / "client" / "state.json").is_file():  # two rounds done
            assert time.monotonic() < deadline and client.poll() is None, "the client never reached round 2"
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        _, server_err = server.communicate(timeout=120)
        _, client_err = client.communicate(timeout=120)
    finally:
        for proc in (server, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert server.returncode == 0, server_err[-3000:]
    assert client.returncode == 0, client_err[-3000:]
    reached = json.loads((tmp_path / "server" / "state.json").read_text())["round"]
    assert 2 <= reached < 1000
    assert json.loads((tmp_path / "client" / "state.json").read_text())["round"] == reached
    assert f"stopped after {reached} of 1000 rounds" in server_err and "--resume" in server_err
    assert f"the server stopped after {reached} rounds" in client_err

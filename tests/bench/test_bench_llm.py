"""`lambdasplit bench llm`: the Table I rows, measured on a tiny model over loopback and an emulated link."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lambdasplit.bench.capture import capture_unavailable
from lambdasplit.bench.links import LINKS, netns_unavailable, parse_link
from lambdasplit.bench.llm import TableConfig, run_table
from lambdasplit.bench.report import caching_savings, markdown, rich_tables, step_lines
from lambdasplit.cli.app import app
from lambdasplit.errors import ConfigError
from lambdasplit.generation.text import encode_prompt
from lambdasplit.split import load_split
from tiny_models import NUM_LAYERS

NEW = 6
PROMPT = "hello world"


@pytest.fixture(scope="module")
def table(tiny_checkpoint, tmp_path_factory):
    path, _ = tiny_checkpoint("llama")
    links = [LINKS["loopback"], parse_link("200/100/20")]
    if reason := netns_unavailable():
        pytest.skip(f"link emulation unavailable here: {reason}")
    capture_dir = None if capture_unavailable() else tmp_path_factory.mktemp("pcap")
    config = TableConfig(
        model=str(path), prompt=PROMPT, new_tokens=NEW, local_layers=(2,), wire_dtype="float32", capture_dir=capture_dir
    )
    return run_table(config, links), path


def rows_of(result, link):
    return {r.method: r for r in result.rows if r.link == link}


def test_every_method_runs_on_every_link_and_split_text_equals_local(table) -> None:
    result, _ = table
    assert not result.skipped
    for link in ("loopback", "200/100/20"):
        rows = rows_of(result, link)
        assert set(rows) == {"cloud-only", "no-cache", "cache", "local-only"}
        for row in rows.values():
            assert row.new_tokens == NEW
            assert row.same_text_as_local is True  # float32 wire: exact
            assert row.total_s > 0 and row.tokens_per_second > 0
        assert rows["cache"].layers == [1, NUM_LAYERS - 1] and rows["cache"].ratio == f"2:{NUM_LAYERS - 2}"


def test_local_only_sends_nothing_and_cloud_only_sends_only_text(table) -> None:
    result, _ = table
    for link in ("loopback", "200/100/20"):
        rows = rows_of(result, link)
        local = rows["local-only"]
        assert (local.client_up, local.client_down, local.server_up, local.pcap_up) == (0, 0, None, None)
        cloud = rows["cloud-only"]
        assert cloud.payload_up == cloud.payload_down == 0  # no tensor crossed
        # Up: one GENERATE frame (a 20-byte header and the JSON request holding the prompt text); down: one TEXT.
        assert 20 < cloud.frame_up < 400 and 20 < cloud.frame_down < 400
        assert cloud.client_up >= cloud.frame_up and cloud.client_down >= cloud.frame_down
        assert cloud.cloud_s > 0 and cloud.local_s == 0


def test_caching_sends_one_position_per_step_and_no_cache_resends_all(table) -> None:
    result, path = table
    split = load_split(path, "1:-1", parts=["head"])
    p = len(encode_prompt(split.tokenizer, PROMPT, chat=True))
    row = 4 * split.hidden_size  # float32 wire
    for link in ("loopback", "200/100/20"):
        rows = rows_of(result, link)
        assert rows["cache"].payload_up == rows["cache"].payload_down == row * (p + NEW - 1)
        assert rows["no-cache"].payload_up == row * sum(p + i for i in range(NEW))
        # Frames add 24 header bytes per message; the socket adds the WebSocket framing (and OPEN/CLOSE).
        assert rows["cache"].frame_up == rows["cache"].payload_up + 24 * NEW
        for r in (rows["cache"], rows["no-cache"]):
            assert r.frame_up < r.client_up < r.frame_up + 16 * NEW + 200
        assert rows["cache"].step_payload == row  # one position per decode step
        assert rows["cache"].step_client_up == row + 24 + 8  # + frame header + the client's WebSocket header
    assert len(caching_savings(result)) == 2 and len(step_lines(result)) == 2


def test_client_and_server_sockets_count_the_same_bytes(table) -> None:
    result, _ = table
    for r in result.rows:
        if r.method == "local-only":
            continue
        assert (r.server_up, r.server_down) == (r.client_up, r.client_down), r.label


def test_capture_reports_ip_bytes_beside_socket_bytes(table) -> None:
    result, _ = table
    if result.config.capture_dir is None:
        pytest.skip(f"no capture: {capture_unavailable()}")
    for r in result.rows:
        if r.method == "local-only":
            continue
        assert r.pcap_up is not None and r.pcap_down is not None
        # IP and TCP headers (and pure ACKs) come on top of the TCP payload.
        assert r.client_up < r.pcap_up < 3 * r.client_up + 4000, r
        assert r.client_down < r.pcap_down < 3 * r.client_down + 4000, r


def test_emulated_link_adds_its_delay_to_every_step(table) -> None:
    result, _ = table
    shaped = rows_of(result, "200/100/20")["cache"]
    # Prefill plus NEW - 1 steps, each at least one 20 ms round trip.
    assert shaped.communication_s >= NEW * 0.020


def test_reports_render(table, tmp_path) -> None:
    result, _ = table
    assert len(rich_tables(result)) == 2
    md = markdown(result)
    assert md.count("| Λ-Split w/ caching |") == 2 and "delay line" in md
    out = tmp_path / "t.json"
    result.write_json(out)
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 8 and data["config"]["new_tokens"] == NEW


def test_cli_bench_llm_writes_json_and_refuses_bad_options(tiny_checkpoint, tmp_path) -> None:
    path, _ = tiny_checkpoint("llama")
    out = tmp_path / "table.json"
    args = ["bench", "llm", "--model", str(path), "--new-tokens", "3", "--local-layers", "2"]
    r = CliRunner().invoke(app, [*args, "--method", "cache", "--method", "local-only", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [x["method"] for x in rows] == ["cache", "local-only"]
    spec = ["--method", "cache", "--speculative", "lookup", "--speculative", "self", "--stop-at-eos"]
    r = CliRunner().invoke(app, [*args, *spec, "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [(x["method"], x["drafter"]) for x in rows] == [("cache", None), ("cache", "lookup"), ("cache", "self")]
    assert rows[1]["text"] == rows[2]["text"] == rows[0]["text"]  # speculative rows: output unchanged
    assert rows[1]["steps"] + 1 == rows[1]["new_tokens"] or rows[1]["drafted"] > 0
    assert "lookup drafts:" in r.output and "same text" in r.output
    r = CliRunner().invoke(app, [*args, "--speculative", "oracle"])
    assert r.exit_code != 0 and "unknown drafter" in str(r.exception or r.output)
    r = CliRunner().invoke(app, [*args, "--link", "nowhere"])
    assert r.exit_code != 0 and "nowhere" in str(r.exception or r.output)
    with pytest.raises(ConfigError, match="methods"):
        TableConfig(methods=("fastest",))

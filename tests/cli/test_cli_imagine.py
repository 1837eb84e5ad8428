"""``lambdasplit imagine --cut-ratio C``: CollaFuse's c, the cloud's share of the steps; the old ``--cut`` (the
device's share) is refused with the value to pass instead, never reinterpreted."""

from __future__ import annotations

from pathlib import Path

import pytest

import in_process
from tiny_pipelines import tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd-imagine")
    tiny_sd_pipeline(folder / "tokenizer-src").save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_the_old_cut_option_fails_naming_the_cut_ratio(capsys, monkeypatch, tmp_path):
    png = tmp_path / "out.png"
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, "imagine", "x", "--out", str(png), "--cut", "0.3")
    assert code == 2
    assert "device's share" in err and "--cut-ratio 0.7" in err
    assert not png.exists()


def test_help_describes_the_cut_ratio_and_hides_the_old_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = in_process.lambdasplit(capsys, monkeypatch, "imagine", "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())  # rich wraps the help in a box
    assert "--cut-ratio" in flat and "the cloud's share of the steps" in flat and "t_c=(1-c)T" in flat
    assert "(0: this device alone, 1: the cloud alone)" in flat
    assert "--cut " not in flat


@pytest.mark.parametrize("ratio", ["0", "1"])
def test_cut_ratio_writes_an_image(pipeline_dir, capsys, monkeypatch, tmp_path, ratio):
    png = tmp_path / "out.png"
    argv = ["imagine", "a red circle", "--pipeline", str(pipeline_dir), "--policy", "collafuse", "--steps", "3",
            "--cut-ratio", ratio, "--out", str(png), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, *argv)
    assert code == 0, err
    assert "wrote" in err and png.exists()


def test_a_cut_ratio_outside_zero_one_is_refused(capsys, monkeypatch, tmp_path):
    argv = ["imagine", "x", "--out", str(tmp_path / "out.png"), "--cut-ratio", "1.5"]
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, *argv)
    assert code == 2 and "--cut-ratio" in err

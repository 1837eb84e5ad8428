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


def test_previews_and_the_wire_picture_are_written_beside_the_image(capsys, monkeypatch, tmp_path):
    """The embedded shapes-t2i, in-process body: previews every 4 steps, the noise that came down at step 6."""
    png = tmp_path / "circle.png"
    argv = ["imagine", "a red circle at the top left on a blue background", "--out", str(png), "--steps", "10",
            "--preview-every", "4", "--noise-png", "6", "--seed", "3"]  # fmt: skip
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, *argv)
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["circle-step004.png", "circle-step008.png", "circle-wire-step006.png", "circle.png"]
    assert "step 6: the cloud sent the noise prediction (1, 4, 16, 16)" in " ".join(err.split())
    from PIL import Image

    wire = Image.open(tmp_path / "circle-wire-step006.png")
    assert wire.mode == "RGBA" and wire.size == (16, 16)  # the 4-channel latent-shaped noise, as the paper draws it
    assert Image.open(tmp_path / "circle-step004.png").size == Image.open(png).size == (32, 32)
    # The same image as without them.
    plain = tmp_path / "plain" / "circle.png"
    argv = ["imagine", "a red circle at the top left on a blue background", "--out", str(plain), "--steps", "10",
            "--seed", "3"]  # fmt: skip
    assert in_process.lambdasplit(capsys, monkeypatch, *argv)[0] == 0
    assert plain.read_bytes() == png.read_bytes()


def test_noise_png_outside_the_steps_or_without_a_transfer_is_refused(capsys, monkeypatch, tmp_path):
    png = tmp_path / "x.png"
    code, _, err = in_process.lambdasplit(
        capsys, monkeypatch, "imagine", "x", "--out", str(png), "--steps", "4", "--noise-png", "5"
    )
    assert code == 2 and "--noise-png names a step from 1 to --steps 4, got 5" in err
    argv = ["imagine", "x", "--out", str(png), "--steps", "4", "--policy", "collafuse", "--cut-ratio", "0.5",
            "--noise-png", "4"]  # fmt: skip
    code, _, err = in_process.lambdasplit(capsys, monkeypatch, *argv)
    assert code == 2 and "nothing came down from the cloud at step 4" in " ".join(err.split())

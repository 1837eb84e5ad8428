"""bench t2i on a tiny pipeline: every policy over a real server, the quantization table, the grid."""

from __future__ import annotations

import math

import pytest
import torch

from lambdasplit.bench.t2i import image_metrics, markdown, run_t2i, save_grid
from tiny_pipelines import tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(folder / "tok").save_pretrained(folder / "pipe")
    return str(folder / "pipe")


def test_bench_t2i_measures_policies_and_quantization(pipeline_dir, tmp_path):
    grid = tmp_path / "grid.png"
    result = run_t2i(
        pipeline_dir,
        steps=3,
        seed=1,
        prompts=["a red circle", "a blue square"],
        wire_dtypes=["float32", "float16", "int8", "int2"],
        grid=grid,
    )
    assert [r.policy for r in result.policies] == ["paper", "unet-lambda", "collafuse"]
    for row in result.policies:
        assert row.max_abs_diff == 0.0  # float32 wire: exact
        assert row.socket_up > 0 and row.socket_down > 0
    paper = result.policies[0]
    assert paper.frames_down == 3 + 2  # OPENED, one noise frame per step, CLOSED
    quant = {q.wire_dtype: q for q in result.quantization}
    assert math.isinf(quant["float32"].psnr_db) and quant["float32"].ssim == 1.0
    assert quant["float16"].psnr_db > quant["int8"].psnr_db > quant["int2"].psnr_db
    assert quant["float32"].noise_frame_bytes > quant["int8"].noise_frame_bytes > quant["int2"].noise_frame_bytes
    table = markdown(result)
    assert "| paper |" in table and "| int2 |" in table and "∞ (identical)" in table
    from PIL import Image

    assert Image.open(grid).size[1] > Image.open(grid).size[0] / 2  # five rows of two images


def test_image_metrics_on_known_images():
    a = torch.zeros(1, 3, 16, 16)
    b = a.clone()
    b[..., 0, 0] = 0.1  # one pixel off by 0.1 in three channels: MSE = 0.01 * 3 / 768
    psnr, ssim = image_metrics(a, b)
    assert psnr == pytest.approx(10 * math.log10(768 / 0.03), rel=1e-6)
    assert 0 < ssim < 1
    assert image_metrics(a, a) == (math.inf, 1.0)


def test_grid_places_rows(tmp_path):
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    save_grid([[red], [red, red]], tmp_path / "g.png", scale=2, pad=1)
    from PIL import Image

    image = Image.open(tmp_path / "g.png")
    assert image.size == (2 * (16 + 1) + 1, 2 * (16 + 1) + 1)
    assert image.getpixel((1, 1)) == (255, 0, 0) and image.getpixel((18, 1)) == (255, 255, 255)

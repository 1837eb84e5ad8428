"""``lambdasplit bench t2i``: split text-to-image measured, the paper's Fig. 5(c) table for our model.

Three parts, each a list of rows:

- ``policies``: one image per policy through a real `lambdasplit serve --pipeline` subprocess on loopback;
  bytes up/down at the client's socket (TCP payload, WebSocket framing included) per image and per step, and the
  wall time per step split into device, cloud (the server's own count) and communication (the rest);
- ``quantization``: the paper policy with every wire dtype from float32 to int2 for the noise (the prompt
  embeddings and initial latent stay float32, as in the paper), PSNR/SSIM of each final image against the FP32
  unsplit pipeline's, averaged over the prompts, and the bytes of one noise frame;
- ``adherence`` (the shapes model only): the detector of `lambdasplit.diffusion.shapes` reads colour, shape,
  position and background off split images of random captions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lambdasplit.client import CloudClient, RemoteDiffusionLink
from lambdasplit.diffusion import DiffusionBody, LocalLink, SplitPipeline, load_pipeline
from lambdasplit.diffusion.pipeline import pipeline_path, unet_fingerprint
from lambdasplit.diffusion.protocol import DEFAULT_PIPELINE, Granularity, Policy
from lambdasplit.diffusion.shapes import detect, random_scenes
from lambdasplit.server.process import body_server_process

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8", "int6", "int4", "int2")
PROMPTS = (
    "a red circle at the top left on a blue background",
    "a yellow square in the center on a black background",
    "a white triangle at the bottom right on a green background",
    "a blue circle at the top right on a yellow background",
    "a green triangle at the bottom left on a white background",
    "a black square at the top left on a red background",
    "a red triangle in the center on a white background",
    "a white circle at the bottom left on a black background",
)


@dataclass
class PolicyRow:
    policy: str
    steps: int
    socket_up: int  # bytes per image at the client's socket
    socket_down: int
    frames_up: int
    frames_down: int
    device_ms_per_step: float
    cloud_ms_per_step: float
    communication_ms_per_step: float
    total_s: float
    max_abs_diff: float  # against the unsplit pipeline (float32 wire: 0 for every exact policy)


@dataclass
class QuantRow:
    wire_dtype: str
    granularity: str
    noise_frame_bytes: int
    bytes_down_per_image: int
    psnr_db: float  # mean over prompts; inf when every image is identical
    ssim: float
    max_abs_diff: float


@dataclass
class T2IResult:
    pipeline: str
    steps: int
    seed: int
    guidance_scale: float
    prompts: list[str]
    policies: list[PolicyRow] = field(default_factory=list)
    quantization: list[QuantRow] = field(default_factory=list)
    adherence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def image_metrics(reference: torch.Tensor, image: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) of two (1, 3, H, W) images in [0, 1], with scikit-image; PSNR is inf for equal images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = reference[0].permute(1, 2, 0).double().numpy()
    img = image[0].permute(1, 2, 0).double().numpy()
    if (ref == img).all():
        return math.inf, 1.0
    psnr = float(peak_signal_noise_ratio(ref, img, data_range=1.0))
    ssim = float(structural_similarity(ref, img, channel_axis=2, data_range=1.0, win_size=7))
    return psnr, ssim


def unsplit_image(pipe: Any, prompt: str, steps: int, seed: int, guidance_scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return (
            pipe(
                prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator, output_type="pt"
            )
            .images.float()
            .cpu()
        )


def run_t2i(
    pipeline: str = DEFAULT_PIPELINE,
    *,
    steps: int = 50,
    seed: int = 42,
    guidance_scale: float = 4.0,
    prompts: Sequence[str] = PROMPTS,
    policies: Sequence[Policy] = ("paper", "unet-lambda", "collafuse"),
    wire_dtypes: Sequence[str] = WIRE_DTYPES,
    granularity: Granularity = "channel",
    adherence_samples: int = 0,
    cloud_threads: int | None = None,
    on_progress: Callable[[str], None] = lambda _: None,
    grid: Path | None = None,
    samples: Path | None = None,
) -> T2IResult:
    pipe = load_pipeline(pipeline, device="cpu", dtype="float32")
    split = SplitPipeline(pipe)
    result = T2IResult(pipeline, steps, seed, guidance_scale, list(prompts))
    references = [unsplit_image(pipe, p, steps, seed, guidance_scale) for p in prompts]
    if policies:
        argv = ["--pipeline", pipeline_path(pipeline), "--dtype", "float32", "--device", "cpu"]
        argv += ["--threads", str(cloud_threads)] if cloud_threads else []
        with body_server_process(argv, timeout=180) as url:
            client = CloudClient(url, fingerprint=unet_fingerprint(pipe.unet.config), timeout=300)
            try:
                for policy in policies:
                    on_progress(f"policy {policy}")
                    split.generate(prompts[0], RemoteDiffusionLink(client), policy=policy, steps=2)  # warm-up
                    before = client.socket_bytes()
                    out = split.generate(
                        prompts[0],
                        RemoteDiffusionLink(client),
                        policy=policy,
                        steps=steps,
                        seed=seed,
                        guidance_scale=guidance_scale,
                        wire_dtype="float32",
                        input_dtype="float32",
                    )
                    after = client.socket_bytes()
                    sent = (after.sent - before.sent) if after and before else out.traffic.bytes_up
                    got = (after.received - before.received) if after and before else out.traffic.bytes_down
                    result.policies.append(
                        PolicyRow(
                            policy,
                            steps,
                            sent,
                            got,
                            out.traffic.frames_up,
                            out.traffic.frames_down,
                            1000 * out.device_seconds / steps,
                            1000 * out.cloud_seconds / steps,
                            1000 * out.communication_seconds / steps,
                            out.total_seconds,
                            float((out.image - references[0]).abs().max()),
                        )
                    )
            finally:
                client.close()
    body = DiffusionBody(pipe.unet, pipeline)
    images: dict[str, list[torch.Tensor]] = {}
    for dtype in wire_dtypes:
        on_progress(f"wire dtype {dtype}")
        psnrs, ssims, diffs, outs = [], [], [], []
        link = LocalLink(body)
        for prompt, reference in zip(prompts, references, strict=True):
            out = split.generate(
                prompt,
                link,
                steps=steps,
                seed=seed,
                guidance_scale=guidance_scale,
                wire_dtype=dtype,
                input_dtype="float32",
                granularity=granularity,
            )
            psnr, ssim = image_metrics(reference, out.image)
            psnrs.append(psnr)
            ssims.append(ssim)
            diffs.append(float((out.image - reference).abs().max()))
            outs.append(out)
        per_image = outs[0].traffic.bytes_down
        result.quantization.append(
            QuantRow(
                dtype,
                granularity,
                per_image // steps,
                per_image,
                math.inf
                if all(math.isinf(p) for p in psnrs)
                else statistics.fmean(p for p in psnrs if math.isfinite(p)),
                statistics.fmean(ssims),
                max(diffs),
            )
        )
        images[dtype] = [o.image for o in outs]
    if grid is not None:
        save_grid([references, *images.values()], grid)
    if samples is not None:
        on_progress("sample grid")
        link = LocalLink(body)
        rows = [
            [split.generate(p, link, steps=steps, seed=s, guidance_scale=guidance_scale).image for s in range(4)]
            for p in prompts
        ]
        save_grid(rows, samples)
    if adherence_samples:
        on_progress(f"adherence over {adherence_samples} captions")
        result.adherence = measure_adherence(split, body, adherence_samples, steps, seed, guidance_scale)
    return result


def measure_adherence(
    split: SplitPipeline, body: DiffusionBody, samples: int, steps: int, seed: int, guidance_scale: float
) -> dict[str, Any]:
    """Split images (paper policy, float16 wire) of random captions, read back by the shapes detector."""
    scenes = random_scenes(samples, seed=seed)
    hits = {"colour": 0, "shape": 0, "position": 0, "background": 0, "colour_and_shape": 0, "all": 0, "none": 0}
    link = LocalLink(body)
    for i, scene in enumerate(scenes):
        out = split.generate(scene.caption, link, steps=steps, seed=seed + i, guidance_scale=guidance_scale)
        seen = detect(out.image[0])
        if seen is None:
            hits["none"] += 1
            continue
        for name in ("colour", "shape", "position", "background"):
            hits[name] += getattr(seen, name) == getattr(scene, name)
        hits["colour_and_shape"] += seen.colour == scene.colour and seen.shape == scene.shape
        hits["all"] += seen == scene
    return {"samples": samples, **{k: v / samples for k, v in hits.items()}}


def save_grid(rows: Sequence[Sequence[torch.Tensor]], path: Path, scale: int = 4, pad: int = 2) -> None:
    """A PNG of images (each (1, 3, H, W) in [0, 1]) in rows, each scaled up ``scale`` times (nearest)."""
    from PIL import Image

    h, w = rows[0][0].shape[-2:]
    cols = max(len(r) for r in rows)
    canvas = torch.ones(3, len(rows) * (h * scale + pad) + pad, cols * (w * scale + pad) + pad)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            big = image[0].clamp(0, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            canvas[:, y : y + h * scale, x : x + w * scale] = big
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def markdown(result: T2IResult) -> str:
    lines = [
        f"Pipeline `{result.pipeline}`, {result.steps} steps, seed {result.seed}, guidance {result.guidance_scale}.",
        "",
    ]
    if result.policies:
        lines += [
            "| policy | up / image | down / image | up / step | down / step | device ms/step | cloud ms/step "
            "| comm. ms/step | image s | max abs diff vs unsplit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result.policies:
            lines.append(
                f"| {r.policy} | {_kb(r.socket_up)} | {_kb(r.socket_down)} | {_kb(r.socket_up / r.steps)} | "
                f"{_kb(r.socket_down / r.steps)} | {r.device_ms_per_step:.1f} | {r.cloud_ms_per_step:.1f} | "
                f"{r.communication_ms_per_step:.1f} | {r.total_s:.2f} | {r.max_abs_diff:.1e} |"
            )
        lines.append("")
    if result.quantization:
        lines += [
            f"| noise on the wire ({result.quantization[0].granularity} scales) | bytes / step | down / image "
            f"| PSNR dB | SSIM | max abs diff |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for q in result.quantization:
            psnr = "∞ (identical)" if math.isinf(q.psnr_db) else f"{q.psnr_db:.1f}"
            lines.append(
                f"| {q.wire_dtype} | {q.noise_frame_bytes:,} | {_kb(q.bytes_down_per_image)} | {psnr} | "
                f"{q.ssim:.4f} | {q.max_abs_diff:.2e} |"
            )
        lines.append("")
    if result.adherence:
        a = result.adherence
        lines.append(
            f"Prompt adherence over {a['samples']} random captions (detector): colour and shape "
            f"{a['colour_and_shape']:.0%}, colour {a['colour']:.0%}, shape {a['shape']:.0%}, position "
            f"{a['position']:.0%}, background {a['background']:.0%}, all four {a['all']:.0%}, nothing detected "
            f"{a['none']:.0%}."
        )
    return "\n".join(lines) + "\n"


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"

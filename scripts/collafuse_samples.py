"""The samples figure of docs/collafuse.md: images of each client at each cut ratio, from a finished
benchmarks/collafuse.py run (its saved U-Nets), same captions and seeds in every row.

    PYTHONPATH=src python scripts/collafuse_samples.py --run artifacts/collafuse --png docs/collafuse-samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from lambdasplit.collafuse.data import client_images
from lambdasplit.collafuse.model import PublicParts
from lambdasplit.collafuse.sampling import sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the --out folder of benchmarks/collafuse.py")
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--unconditional", action="store_true")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = PublicParts.load()
    runs = sorted((p for p in args.run.glob("c*") if (p / "server" / "unet").is_dir()), key=lambda p: float(p.name[1:]))
    n = args.per_client
    fig, axes = plt.subplots(len(runs) + 1, args.clients * n, figsize=(args.clients * n * 0.9, (len(runs) + 1) * 0.95))
    for k in range(args.clients):
        real = client_images(k, args.clients, n, seed=101)  # fresh draws of its distribution, not training images
        captions = [""] * n if args.unconditional else real.captions
        contexts = parts.contexts(captions)
        for j in range(n):
            axes[0, k * n + j].imshow((real.images[j] / 2 + 0.5).permute(1, 2, 0).numpy())
        for row, folder in enumerate(runs, start=1):
            c = float(folder.name[1:])
            server = UNet2DConditionModel.from_pretrained(folder / "server" / "unet").eval()
            client = UNet2DConditionModel.from_pretrained(folder / f"client-{k}" / "unet").eval()
            out = sample(server, client, c, contexts, parts.latent_shape, steps=args.steps,
                         generator=torch.Generator().manual_seed(k))  # fmt: skip
            for j, image in enumerate(parts.decode(out.latents)):
                axes[row, k * n + j].imshow(image.permute(1, 2, 0).numpy())
            axes[row, 0].set_ylabel(f"c = {c:g}", rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_ylabel("real", rotation=0, ha="right", va="center", fontsize=8)
    for k in range(args.clients):
        axes[0, k * n].set_title(f"client {k}", fontsize=8, loc="left")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

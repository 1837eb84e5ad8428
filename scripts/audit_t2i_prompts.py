"""What the cloud reads from a split image's prompt embeddings: CLIP prompt inversion on shapes-t2i.

    python scripts/audit_t2i_prompts.py --captions 100 --seed 7 --wire-dtype float16 --wire-dtype int8

For random captions of the default model, the positive prompt's embeddings as the device sends them (every
policy but unconditioned collafuse sends them; ``--input-dtype`` of `lambdasplit imagine`, channel scales),
attacked with `lambdasplit.audit.attacks.clip_inversion` and the public text encoder. Prints per wire dtype
the share of captions read back exactly, token accuracy, and seconds per caption.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lambdasplit.audit.attacks.clip_inversion import invert_prompt_embeds
from lambdasplit.diffusion import DEFAULT_PIPELINE, load_pipeline
from lambdasplit.diffusion.protocol import layout, restore
from lambdasplit.diffusion.shapes import random_scenes
from lambdasplit.wire import WireDtype, decode_tensor, encode_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--wire-dtype", action="append", help="input dtype on the wire (repeatable)")
    args = ap.parse_args()
    pipe = load_pipeline(DEFAULT_PIPELINE, device="cpu", dtype="float32")
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    scenes = random_scenes(args.captions, seed=args.seed)
    for name in args.wire_dtype or ["float16"]:
        dtype = WireDtype.parse(name)
        exact, accuracy, seconds = 0, [], []
        for scene in scenes:
            ids = tokenizer(scene.caption, padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
            with torch.no_grad():
                embeds = pipe.encode_prompt(scene.caption, "cpu", 1, False)[0][0]
            payload, shape = encode_tensor(layout(embeds[None], dtype, "channel"), dtype)
            sent = restore(decode_tensor(payload, dtype, shape), tuple(embeds[None].shape), "embeds")[0]
            result = invert_prompt_embeds(encoder, sent, ids.tolist(), bos=int(ids[0]))
            text = tokenizer.decode(result.recovered, skip_special_tokens=True)
            exact += text == scene.caption
            accuracy.append(result.token_accuracy)
            seconds.append(result.seconds)
        print(
            f"{dtype.name.lower()}: {exact}/{len(scenes)} captions read back exactly, token accuracy "
            f"{statistics.fmean(accuracy):.1%}, {statistics.fmean(seconds):.2f} s per caption"
        )


if __name__ == "__main__":
    main()

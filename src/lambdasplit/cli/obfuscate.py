"""``lambdasplit obfuscate``: make a secret key and the body checkpoint transformed for it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lambdasplit.cli.options import DEFAULTS, Layers, Model
from lambdasplit.errors import ConfigError
from lambdasplit.privacy.keys import INNER, KINDS, make_key
from lambdasplit.privacy.obfuscate import obfuscate_body, write_obfuscated_body
from lambdasplit.split import load_split

_err = Console(stderr=True)


def obfuscate(
    key_out: Annotated[Path, typer.Option("--key-out", help="Where to write the key (stays on the device).")],
    body_out: Annotated[
        Path, typer.Option("--body-out", help="Folder for the obfuscated body (give it to the body server).")
    ],
    model: Model = DEFAULTS["model"],
    layers: Layers = DEFAULTS["layers"],
    kind: Annotated[str, typer.Option(help=f"Hidden-dimension secret: {' or '.join(KINDS)}.")] = "permutation",
    inner: Annotated[
        str, typer.Option(help=f"Inner secrets in every body layer, comma-separated: {', '.join(INNER)} (or none).")
    ] = "",
    seed: Annotated[int | None, typer.Option(help="Seed (reproducible key, for tests); default: fresh.")] = None,
    dtype: Annotated[str, typer.Option(help="dtype of the written body: float32, float16 or bfloat16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file.")] = False,
) -> None:
    """Draw a secret key and write the body transformed for it (STIP-style permutation or a rotation).

    The device keeps the key and passes it with `--key`; the body server runs
    `lambdasplit serve --model BODY_OUT --layers X:Y`. The split's output is unchanged (tests check the logits
    within 1e-4). What the key hides, and from whom, is measured by `lambdasplit audit`: on SmolLM2 the cloud
    recovered every key from the body's weights and an eavesdropper read the prompt through permutation and
    rotation keys from one conversation's traffic (99.7-100% of prompt tokens at X = 0-8; docs/threat-model.md).
    """
    if key_out.exists() and not force:
        raise ConfigError(f"{key_out} exists; pass --force to replace it (the body made for it stops matching)")
    names = tuple(n.strip() for n in inner.split(",") if n.strip() and n.strip() != "none")
    with _err.status(f"loading the body of {model} (layers {layers})"):
        split = load_split(model, layers, parts=("body",), dtype=dtype, device="cpu")
    assert split.body is not None
    key = make_key(split.config, split.points, split.fingerprint, kind=kind, inner=names, seed=seed)  # type: ignore[arg-type]
    with _err.status("transforming the body's weights"):
        obfuscate_body(split.body, key, split.config)
        write_obfuscated_body(split.body, key, split.config, body_out)
    key.save(key_out)
    _err.print(
        f"key {key.key_id} ({key.kind}{', inner: ' + ', '.join(key.inner) if key.inner else ''}) -> {key_out}\n"
        f"obfuscated body, layers {split.points} -> {body_out}\n"
        f"serve it:  lambdasplit serve --model {body_out} --layers {split.points}\n"
        f"use it:    lambdasplit generate PROMPT --cloud ws://HOST:PORT/v1/split --key {key_out}"
    )

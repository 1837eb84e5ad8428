"""``package``: a private model into a server bundle and one user bundle per group (``privacy.bundles``).

For each user group the developer draws fresh secrets (a hidden-dimension permutation or rotation and the
inner secrets), transforms a copy of the body with them, and writes:

    SERVER_OUT/lambdasplit-bundle.json        groups -> body fingerprints, every file's and tensor's SHA-256
    SERVER_OUT/bodies/<group>/                config, the transformed body layers [X, Y), the pairing marker
    USER_OUT/<group>/lambdasplit-bundle.json  the group and its fingerprint, every file's and tensor's SHA-256
    USER_OUT/<group>/model.safetensors        embedding, layers [0, X) and [Y, N), final norm, LM head
    USER_OUT/<group>/key.safetensors          the group's hidden-dimension key (no inner secret), mode 0600
    USER_OUT/<group>/config.json, tokenizer   what the device needs to tokenise and run its ends

Nothing else is written; in particular no key goes to the server and no body layer to a user.

``layout="stip"`` is STIP's own layout (points 0:N): the body is every layer, the final norm and the LM head,
its hidden dimension and its vocabulary permuted (``make_key(..., vocabulary=True)``); the user bundle holds
the embedding alone (no layer, no final norm, no LM head) and the key, whose vocabulary permutation puts the
logits the server returns back in order.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lambdasplit.config import Layout, SplitPoints, check_layout
from lambdasplit.errors import ConfigError
from lambdasplit.models.checkpoint import BUNDLE_MANIFEST, OBFUSCATED_MARKER, Checkpoint
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.privacy.bundles import KEY_FILE, Manifest, describe_files, write_manifest
from lambdasplit.privacy.keys import INNER, KeyKind, ObfuscationKey, make_key
from lambdasplit.privacy.obfuscate import obfuscate_body, write_obfuscated_body
from lambdasplit.split.loader import DEFAULT_LAYERS, load_split

_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")
_SKIP = {OBFUSCATED_MARKER, BUNDLE_MANIFEST, "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class PackageReport:
    server_out: Path
    user_out: dict[str, Path]  # group -> its user bundle
    fingerprints: dict[str, str]  # group -> the fingerprint its devices present
    points: str


def package(
    model: str | os.PathLike[str],
    layers: str | None,
    server_out: str | os.PathLike[str],
    user_out: str | os.PathLike[str],
    *,
    layout: str = "head-tail",
    groups: int = 1,
    kind: KeyKind = "permutation",
    inner: tuple[str, ...] = INNER,
    seed: int | None = None,
    dtype: str = "float32",
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PackageReport:
    """Write the server bundle and ``groups`` user bundles of ``model`` cut at ``layers`` (None: ``2:-2`` for the
    head/tail layout, ``0:N`` for STIP's, the only points it takes).

    ``seed`` makes the secrets reproducible (tests); by default they come from the OS's randomness. ``force``
    replaces output folders that exist; otherwise a non-empty one is refused.
    """
    layout = check_layout(layout)
    if groups < 1:
        raise ConfigError(f"groups={groups} is invalid: at least one user group")
    server_dir, user_dir = Path(server_out), Path(user_out)
    if server_dir.resolve() == user_dir.resolve():
        raise ConfigError("the server bundle and the user bundles must go to different folders")
    for folder in (server_dir, user_dir):
        if folder.exists() and any(folder.iterdir()):
            if not force:
                raise ConfigError(f"{folder} exists and is not empty; pass force=True (--force) to replace it")
            shutil.rmtree(folder)
    say = progress or (lambda _: None)
    path = resolve_checkpoint(model, quiet=True)
    checkpoint = Checkpoint(path)
    if checkpoint.obfuscation is not None or checkpoint.bundle_role is not None:
        raise ConfigError(f"{path} is already transformed or bundled; package the developer's own checkpoint")
    num_layers = int(checkpoint.config.num_hidden_layers)
    points = SplitPoints.parse(layers or ("0:" if layout == "stip" else DEFAULT_LAYERS), num_layers)
    if layout == "stip" and (points.head_layers, points.body_end) != (0, num_layers):
        raise ConfigError(f"STIP's layout puts every layer in the cloud (--layers 0:{num_layers}), not {points}")
    base = checkpoint.fingerprint()
    model_type = str(checkpoint.config.model_type)
    names = [f"g{i}" for i in range(groups)]
    fingerprints: dict[str, str] = {}
    users: dict[str, Path] = {}
    ends = _end_tensors(checkpoint, points, layout)
    stip = layout == "stip"
    for i, group in enumerate(names):
        say(f"group {group}: drawing secrets and transforming the body (layers {points}, {layout} layout)")
        split = load_split(path, points, parts=("body",), dtype=dtype, device="cpu", quiet=True, layout=layout)
        assert split.body is not None
        key = make_key(
            split.config,
            points,
            base,
            kind=kind,
            inner=inner,
            seed=None if seed is None else seed + i,
            vocabulary=stip,
        )
        obfuscate_body(split.body, key, split.config)
        write_obfuscated_body(split.body, key, split.config, server_dir / "bodies" / group)
        fingerprints[group] = key.body_fingerprint()
        say(f"group {group}: writing the user bundle")
        users[group] = _write_user(user_dir / group, path, ends, key.for_user(), points, group, model_type, layout)
    files = describe_files(server_dir)
    write_manifest(server_dir, Manifest("server", layout, str(points), model_type, fingerprints, files))
    return PackageReport(server_dir, users, fingerprints, str(points))


def _end_tensors(checkpoint: Checkpoint, points: SplitPoints, layout: Layout) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint but the body's layers [X, Y): embedding, head and tail layers, norm, LM head;
    in STIP's layout, the embedding alone."""
    body = {f"model.layers.{i}." for i in range(points.head_layers, points.body_end)}
    keys = [k for k in checkpoint.keys() if not any(k.startswith(prefix) for prefix in body)]  # noqa: SIM118 - not a dict
    if layout == "stip":
        keys = [k for k in keys if "embed_tokens." in k]
    return {k: t.contiguous() for k, t in checkpoint.load(keys).items()}


def _write_user(
    folder: Path,
    source: Path,
    tensors: dict[str, torch.Tensor],
    key: ObfuscationKey,
    points: SplitPoints,
    group: str,
    model_type: str,
    layout: Layout,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():  # config, tokenizer, generation config, chat template
        if file.is_file() and file.suffix not in _WEIGHTS and file.name not in _SKIP:
            shutil.copy2(file, folder / file.name)
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    key.save(folder / KEY_FILE)
    files = describe_files(folder)
    write_manifest(folder, Manifest("user", layout, str(points), model_type, {group: key.body_fingerprint()}, files))
    return folder

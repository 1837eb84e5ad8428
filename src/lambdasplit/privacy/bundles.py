"""Bundles: what a model developer hands out in STIP's three-party setting, and how they are checked.

The developer owns private weights and draws the secrets (``lambdasplit developer package``). It gives:

- the **model server** a *server bundle*: per user group, the body transformed with that group's key, and
  nothing else: no embedding, no final norm, no LM head, no secret (``bodies/<group>/``, each a body
  checkpoint ``lambdasplit serve`` loads);
- each group's **users** a *user bundle*: the config, the tokenizer, the head and tail weights (embedding,
  layers outside the body, final norm, LM head) and the group's hidden-dimension key, without the inner
  secrets (those stay with the developer and, folded into the weights, with the server's body).

In STIP's own layout (``layout: "stip"`` in the manifests) the body is every layer, the final norm and the LM
head (its vocabulary permuted too), and the user bundle holds the embedding alone and the key with its
vocabulary permutation.

Both are folders with a manifest (``lambdasplit-bundle.json``) that lists every file with its SHA-256, and
every tensor of every safetensors file with the SHA-256 of its bytes, so that a missing file, an extra
weight file, a tampered tensor or a manifest whose fingerprint does not match the key is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from lambdasplit.config import check_layout
from lambdasplit.errors import ConfigError
from lambdasplit.models.checkpoint import BUNDLE_MANIFEST
from lambdasplit.privacy.keys import ObfuscationKey
from lambdasplit.privacy.obfuscate import protect
from lambdasplit.split.loader import SplitModel, load_split

MANIFEST = BUNDLE_MANIFEST
FORMAT = 1
KEY_FILE = "key.safetensors"
Role = Literal["server", "user"]


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest. ``groups`` maps each group to the fingerprint its body pairs on (a user bundle
    holds one group; a server bundle every group it serves)."""

    role: Role
    layout: str
    points: str
    model_type: str
    groups: dict[str, str]
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256": hex, "tensors": {name: hex}?}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "role": self.role,
            "layout": self.layout,
            "points": self.points,
            "model_type": self.model_type,
            "groups": self.groups,
            "files": self.files,
        }


def is_bundle(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensor_digests(path: Path) -> dict[str, str]:
    """SHA-256 of each tensor's bytes (dtype and shape included), by name."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(name)
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out[name] = h.hexdigest()
    return out


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` for every file under ``folder`` (the manifest itself excluded)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry: dict[str, Any] = {"sha256": _sha256(path)}
        if path.suffix == ".safetensors":
            entry["tensors"] = _tensor_digests(path)
        files[path.relative_to(folder).as_posix()] = entry
    return files


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: str | Path, role: Role | None = None) -> Manifest:
    """The manifest of the bundle at ``folder``, after checking every file it lists against it.

    Refused, naming the culprit: no manifest, another role, a file listed but missing, a file whose bytes
    changed (the tensor, for a safetensors file), a weight file the manifest does not list.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{folder} is not a lambdasplit bundle: {MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(
            role=raw["role"],
            layout=raw["layout"],
            points=raw["points"],
            model_type=raw["model_type"],
            groups=dict(raw["groups"]),
            files=dict(raw["files"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid bundle manifest: {exc!r}") from exc
    if raw.get("format") != FORMAT:
        raise ConfigError(f"{path} has bundle format {raw.get('format')!r}; this lambdasplit reads format {FORMAT}")
    if role is not None and manifest.role != role:
        raise ConfigError(f"{folder} is a {manifest.role} bundle, not a {role} bundle")
    for name, entry in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise ConfigError(f"{folder}: {name} is listed in {MANIFEST} but missing")
        if _sha256(file) != entry["sha256"]:
            raise ConfigError(f"{folder}: {_changed(file, entry)} does not match {MANIFEST} (tampered or corrupted)")
    listed = set(manifest.files)
    extra = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*.safetensors")
        if p.relative_to(folder).as_posix() not in listed
    )
    if extra:
        raise ConfigError(f"{folder}: {extra[0]} is not listed in {MANIFEST}; a bundle holds exactly what it lists")
    return manifest


def _changed(file: Path, entry: dict[str, Any]) -> str:
    """What changed in ``file``: the first tensor whose bytes differ, or the file itself."""
    expected: dict[str, str] | None = entry.get("tensors")
    if expected is None:
        return f"the file {file.name}"
    try:
        found = _tensor_digests(file)
    except Exception:  # not even a readable safetensors file any more
        return f"the file {file.name} (no longer a readable safetensors file)"
    for name, digest in expected.items():
        if found.get(name) != digest:
            return f"tensor {name!r} in {file.name}" if name in found else f"tensor {name!r} (gone) in {file.name}"
    added = sorted(set(found) - set(expected))
    return f"tensor {added[0]!r} (not in the manifest) in {file.name}" if added else f"the file {file.name}"


def group_folder(folder: str | Path, manifest: Manifest, group: str | None) -> tuple[str, Path]:
    """A server bundle's body folder for ``group`` (the only one when None and there is just one)."""
    if group is None:
        if len(manifest.groups) != 1:
            raise ConfigError(
                f"{folder} serves {len(manifest.groups)} user groups ({', '.join(manifest.groups)}): name one "
                "with --group"
            )
        group = next(iter(manifest.groups))
    if group not in manifest.groups:
        raise ConfigError(f"{folder} has no user group {group!r}; it has {', '.join(manifest.groups)}")
    return group, Path(folder) / "bodies" / group


@dataclass(frozen=True)
class UserBundle:
    """A user's bundle, checked: the folder is a checkpoint of the head and tail; ``key`` its group's key."""

    folder: Path
    manifest: Manifest
    group: str
    key: ObfuscationKey

    @property
    def fingerprint(self) -> str:
        """What the device presents at the handshake: the fingerprint of its group's body."""
        return self.manifest.groups[self.group]

    @classmethod
    def open(cls, folder: str | Path) -> UserBundle:
        folder = Path(folder)
        manifest = read_manifest(folder, "user")
        if len(manifest.groups) != 1:
            raise ConfigError(f"{folder}: a user bundle belongs to one group, its manifest names {manifest.groups}")
        group, fingerprint = next(iter(manifest.groups.items()))
        key = ObfuscationKey.load(folder / KEY_FILE)
        if key.layers:
            raise ConfigError(
                f"{folder / KEY_FILE} holds inner secrets; a user bundle must not (they stay with the developer)"
            )
        if key.body_fingerprint() != fingerprint:
            raise ConfigError(
                f"{folder}: {MANIFEST} pairs group {group!r} with fingerprint {fingerprint}, but {KEY_FILE} is the key "
                f"of the body with fingerprint {key.body_fingerprint()}: the manifest or the key was replaced"
            )
        if key.points != manifest.points:
            raise ConfigError(f"{folder}: the key is for layers {key.points}, the manifest says {manifest.points}")
        if (key.vocab is not None) != (manifest.layout == "stip"):
            raise ConfigError(
                f"{folder}: the manifest says the {manifest.layout} layout, but {KEY_FILE} "
                f"{'permutes' if key.vocab is not None else 'does not permute'} the vocabulary"
            )
        return cls(folder, manifest, group, key)

    def protect(self, split: SplitModel) -> SplitModel:
        """Use the bundle's key on ``split`` (its head and tail loaded from this bundle)."""
        split.fingerprint = self.key.base_fingerprint  # the bundle's own files are the private model's ends
        return protect(split, self.key)


def load_server_bodies(
    folder: str | Path,
    group: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> dict[str, SplitModel]:
    """The transformed bodies of a server bundle, checked against its manifest, at its split points: every user
    group's (one ``BodyServer`` serves them all), or only ``group``'s."""
    manifest = read_manifest(folder, "server")
    groups = list(manifest.groups) if group is None else [group]
    return {
        name: load_split(
            group_folder(folder, manifest, name)[1],
            manifest.points,
            parts=("body",),
            device=device,
            dtype=dtype,
            quiet=True,
            layout=check_layout(manifest.layout),
        )
        for name in groups
    }


def load_server_body(
    folder: str | Path,
    group: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> SplitModel:
    """One group's transformed body (``group`` may be None when the bundle has one group only)."""
    manifest = read_manifest(folder, "server")
    name, _ = group_folder(folder, manifest, group)  # refuses None when there are several groups
    return load_server_bodies(folder, name, device=device, dtype=dtype)[name]

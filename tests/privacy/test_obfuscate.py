"""Obfuscated bodies (secret permutation / rotation + inner secrets) compute exactly what the plain split does."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lambdasplit
from lambdasplit.client import connect_device
from lambdasplit.errors import ConfigError, RemoteError, UnsupportedModelError
from lambdasplit.generation.session import LocalBodyLink, SplitDecoder
from lambdasplit.privacy.keys import INNER, ObfuscationKey, make_key
from lambdasplit.privacy.obfuscate import obfuscate_body, protect, write_obfuscated_body
from lambdasplit.split import SplitModel, load_split
from servers import body_server
from tiny_models import FAMILIES

PROMPT = torch.tensor([[1, 17, 40, 92, 5, 33, 250, 7, 61, 12, 99, 140, 8, 3, 77, 21]])
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny(random_norms_checkpoint) -> Callable[[str], Path]:
    return random_norms_checkpoint


def logits(split: SplitModel, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    """Logits of every prompt position and of three decode steps, through the split."""
    assert split.body is not None
    decoder = SplitDecoder(split, LocalBodyLink(split.body))
    rows = [decoder._run(prompt[0].tolist(), prompt.shape[1])]
    rows += [decoder.step(t)[None] for t in (5, 6, 7)]
    return torch.cat(rows)


def protected(path: Path | str, layers: str, kind: str, inner: tuple[str, ...], seed: int = 1) -> SplitModel:
    split = load_split(path, layers, quiet=True)
    protect(split, make_key(split.config, split.points, split.fingerprint, kind=kind, inner=inner, seed=seed))  # type: ignore[arg-type]
    return split


INNER_WITHOUT_QK = ("ffn", "kv-heads", "v-channels")


# OLMo-2 is post-norm (rotation refused) and OLMo-2 / Qwen3 normalise q and k (qk-planes refused): test_refusals.
CASES = [
    (family, kind, inner if family not in ("qwen3", "olmo2") else tuple(n for n in inner if n != "qk-planes"))
    for family in sorted(FAMILIES)
    for kind in ("permutation", "rotation")
    for inner in ((), INNER)
    if not (family == "olmo2" and kind == "rotation")
]


@pytest.mark.parametrize(("family", "kind", "inner"), CASES)
def test_obfuscated_split_equals_plain_split(
    tiny: Callable[[str], Path], family: str, kind: str, inner: tuple[str, ...]
) -> None:
    path = tiny(family)
    plain = load_split(path, "1:4", quiet=True)
    obfuscated = protected(path, "1:4", kind, inner)
    assert (logits(obfuscated) - logits(plain)).abs().max().item() < 1e-4
    if family in ("llama", "qwen2"):  # greedy tokens too (logits equal within 1e-4 is the stronger check)
        want = lambdasplit.generate(plain, PROMPT[0].tolist(), max_new_tokens=12)
        assert lambdasplit.generate(obfuscated, PROMPT[0].tolist(), max_new_tokens=12).token_ids == want.token_ids


@pytest.mark.parametrize("kind", ["permutation", "rotation"])
def test_the_body_really_changed(tiny: Callable[[str], Path], kind: str) -> None:
    """Without the key on the device, the obfuscated body's output is wrong: the weights were transformed."""
    path = tiny("llama")
    plain = load_split(path, "1:4", quiet=True)
    obfuscated = protected(path, "1:4", kind, INNER)
    obfuscated.wire_transform = None
    assert (logits(obfuscated) - logits(plain)).abs().max().item() > 1e-2
    assert plain.body is not None and obfuscated.body is not None
    w, w2 = (s.body.model.layers[0].self_attn.q_proj.weight for s in (plain, obfuscated))  # type: ignore[union-attr]
    assert not torch.allclose(w, w2)


def test_refusals_leave_the_body_untouched(tiny: Callable[[str], Path]) -> None:
    for family, kind, inner, reason in [
        ("olmo2", "rotation", (), "post-norm"),
        ("qwen3", "permutation", INNER, "normalises q and k"),
        ("olmo2", "permutation", ("qk-planes",), "normalises q and k"),
    ]:
        split = load_split(tiny(family), "1:4", quiet=True)
        assert split.body is not None and split.body.model is not None
        before = {k: v.clone() for k, v in split.body.model.state_dict().items()}
        key = make_key(split.config, split.points, split.fingerprint, kind=kind, inner=inner, seed=0)  # type: ignore[arg-type]
        with pytest.raises(UnsupportedModelError, match=reason):
            obfuscate_body(split.body, key, split.config)
        after = split.body.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_key_checks_model_and_layers(tiny: Callable[[str], Path]) -> None:
    split = load_split(tiny("llama"), "1:4", quiet=True)
    key = make_key(split.config, split.points, split.fingerprint, seed=0)
    with pytest.raises(ConfigError, match="layers 1:4"):
        protect(load_split(tiny("llama"), "2:4", quiet=True), key)
    with pytest.raises(ConfigError, match="fingerprint"):
        protect(load_split(tiny("qwen2"), "1:4", quiet=True), key)
    with pytest.raises(ConfigError, match="unknown inner"):
        make_key(split.config, split.points, split.fingerprint, inner=("heads",))


def test_key_round_trips_through_its_file(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    split = load_split(tiny("qwen2"), "1:4", quiet=True)
    for kind in ("permutation", "rotation"):
        key = make_key(split.config, split.points, split.fingerprint, kind=kind, inner=INNER, seed=5)  # type: ignore[arg-type]
        path = key.save(tmp_path / f"{kind}.key")
        if sys.platform != "win32":
            assert path.stat().st_mode & 0o077 == 0  # the device's secret: not group/world readable
        loaded = ObfuscationKey.load(path)
        assert loaded.key_id == key.key_id and loaded.inner == key.inner == list(INNER)
        h = torch.randn(2, 3, split.hidden_size)
        assert torch.equal(loaded.encode(h), key.encode(h))
        assert torch.allclose(loaded.decode(loaded.encode(h)), h, atol=1e-6)
    fresh = [make_key(split.config, split.points, split.fingerprint).key_id for _ in range(2)]
    assert fresh[0] != fresh[1]  # no seed: a fresh key each time


def test_obfuscated_body_served_over_the_network(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    """`obfuscate` writes a body folder; the server runs it; only a device holding the key pairs with it."""
    path = tiny("llama")
    split = load_split(path, "1:4", parts=("body",), quiet=True)
    assert split.body is not None
    key = make_key(split.config, split.points, split.fingerprint, kind="rotation", inner=INNER, seed=2)
    obfuscate_body(split.body, key, split.config)
    body_dir = write_obfuscated_body(split.body, key, split.config, tmp_path / "body")
    key_file = key.save(tmp_path / "device.key")
    with pytest.raises(ConfigError, match="obfuscated body for layers 1:4"):
        load_split(body_dir, "1:3", parts=("body",), quiet=True)

    want = lambdasplit.generate(load_split(path, "1:4", quiet=True), PROMPT[0].tolist(), max_new_tokens=10)
    with body_server("--model", str(body_dir), "--layers", "1:4") as url:
        device, client = connect_device(url, path, key=key_file, quiet=True)
        with client:
            got = lambdasplit.generate(device, PROMPT[0].tolist(), link=client.open_session(), max_new_tokens=10)
        assert got.token_ids == want.token_ids
        with pytest.raises(RemoteError, match="fingerprint"):
            connect_device(url, path, quiet=True)  # the plain model, no key: refused at the handshake


def in_float64(split: SplitModel) -> SplitModel:
    for part in (split.head, split.body, split.tail):
        assert part is not None
        part.double()
    return split


@pytest.fixture(scope="module")
def smollm2_plain() -> tuple[torch.Tensor, torch.Tensor]:
    """Plain split logits in float32 and in float64."""
    return logits(load_split(SMOLLM2, "2:28", quiet=True)), logits(in_float64(load_split(SMOLLM2, "2:28", quiet=True)))


@pytest.mark.parametrize("kind", ["permutation", "rotation"])
def test_smollm2_obfuscated_equals_plain(smollm2_plain: tuple[torch.Tensor, torch.Tensor], kind: str) -> None:
    """Within 1e-4 with float64 weights, float32 rounding only in float32 (logits of ~30), the same greedy text."""
    plain32, plain64 = smollm2_plain
    obfuscated = protected(SMOLLM2, "2:28", kind, INNER)
    assert (logits(obfuscated) - plain32).abs().max().item() < 5e-4  # measured 0.7-1.2e-4; split vs unsplit 4e-5
    prompt = "Name three primary colours."
    want = lambdasplit.generate(load_split(SMOLLM2, "2:28", quiet=True), prompt, chat=True, max_new_tokens=16)
    assert lambdasplit.generate(obfuscated, prompt, chat=True, max_new_tokens=16).token_ids == want.token_ids
    split64 = in_float64(load_split(SMOLLM2, "2:28", quiet=True))
    protect(split64, make_key(split64.config, split64.points, split64.fingerprint, kind=kind, inner=INNER, seed=1))  # type: ignore[arg-type]
    assert (logits(split64) - plain64).abs().max().item() < 1e-4  # measured 1.8e-5: HF's RMSNorm computes in float32

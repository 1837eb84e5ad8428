"""Bundles from `developer package`: what each holds (read from the files), exactness, and refusals by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lambdasplit.client import CloudClient, connect_device
from lambdasplit.developer import package
from lambdasplit.errors import ConfigError, RemoteError
from lambdasplit.generation import generate
from lambdasplit.generation.session import LocalBodyLink, SplitDecoder
from lambdasplit.privacy.bundles import MANIFEST, UserBundle, load_server_body, read_manifest
from lambdasplit.split import SplitModel, load_split
from servers import body_server, in_threads

PROMPT = [1, 17, 40, 92, 5, 33, 250, 7, 61, 12, 99, 140, 8, 3, 77, 21]
SECRET_NAMES = ("matrix", "permutation", "ffn", "kv_heads", "v_channels", "qk_angles")


@pytest.fixture(scope="module")
def private(random_norms_checkpoint) -> Callable[[str], Path]:
    return random_norms_checkpoint


def tensors_of(folder: Path) -> dict[str, list[str]]:
    out = {}
    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out[file.relative_to(folder).as_posix()] = list(f.keys())
    return out


def split_logits(device: SplitModel, body: SplitModel) -> torch.Tensor:
    assert body.body is not None
    decoder = SplitDecoder(device, LocalBodyLink(body.body))
    rows = [decoder._run(PROMPT, len(PROMPT))]
    rows += [decoder.step(t)[None] for t in (5, 6, 7)]
    return torch.cat(rows)


def unsplit_logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[*PROMPT, 5, 6, 7]])
    with torch.no_grad():
        return model(ids).logits[0]  # (T + 3, V): every prompt position, then the three decode steps


def bundles(private_path: Path, tmp_path: Path, layers: str, **kwargs) -> tuple[Path, Path]:
    report = package(private_path, layers, tmp_path / "server", tmp_path / "users", seed=11, **kwargs)
    return report.server_out, report.user_out["g0"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["permutation", "rotation"])
def test_bundles_hold_only_their_part_and_the_split_equals_the_private_model(private, tmp_path, family, kind) -> None:
    path = private(family)
    server, user = bundles(path, tmp_path, "1:4", kind=kind)
    # The server bundle: transformed body layers [1, 4) only; no embedding, final norm, LM head or secret.
    server_tensors = [n for names in tensors_of(server).values() for n in names]
    assert server_tensors and all(
        n.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3.")) for n in server_tensors
    )
    assert not any(s in n for n in server_tensors for s in ("embed", "lm_head", "model.norm.", *SECRET_NAMES))
    assert not list(server.rglob("key*")) and not list(server.rglob("tokenizer*"))
    # The user bundle: no body layer, and the key without any inner secret.
    user_tensors = tensors_of(user)
    assert not any(
        n.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3."))
        for n in user_tensors["model.safetensors"]
    )
    assert (
        "model.embed_tokens.weight" in user_tensors["model.safetensors"]
        and "model.norm.weight" in user_tensors["model.safetensors"]
    )
    assert set(user_tensors["key.safetensors"]) <= {"matrix", "permutation"}
    assert (user / "key.safetensors").stat().st_mode & 0o077 == 0
    # Exact: the split from the two bundles computes the private model's logits.
    bundle = UserBundle.open(user)
    device = bundle.protect(load_split(user, "1:4", parts=("head", "tail")))
    body = load_server_body(server)
    got, expected = split_logits(device, body), unsplit_logits(path)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_over_a_server_the_user_bundle_pairs_with_its_body(private, tmp_path) -> None:
    path = private("llama")
    server, user = bundles(path, tmp_path, "1:4")
    expected = generate(load_split(path, "1:4"), PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    with body_server("--model", str(server)) as url:
        split, client = connect_device(url, user)
        with client:
            got = generate(split, PROMPT, max_new_tokens=10, ignore_eos=True, link=client.open_session("float32"))
        assert got.token_ids == expected
        # The private model itself (the developer's checkpoint) does not pair with the transformed body.
        with pytest.raises(RemoteError, match="model_mismatch"):
            connect_device(url, path)


def test_one_server_hosts_every_group_and_a_device_drives_only_its_own(private, tmp_path) -> None:
    path = private("llama")
    report = package(path, "1:4", tmp_path / "server", tmp_path / "users", groups=2, seed=5)
    manifest = read_manifest(report.server_out, "server")
    assert sorted(manifest.groups) == ["g0", "g1"] and len(set(manifest.groups.values())) == 2
    keys = [load_file(str(report.user_out[g] / "key.safetensors"))["matrix"] for g in ("g0", "g1")]
    assert not torch.equal(keys[0], keys[1])  # each group its own secrets
    with pytest.raises(ConfigError, match=r"2 user groups \(g0, g1\): name one with --group"):
        load_server_body(report.server_out)
    expected = generate(load_split(path, "1:4"), PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    with body_server("--model", str(report.server_out), "--max-batch", "4") as url:
        devices = [connect_device(url, report.user_out[g]) for g in ("g0", "g1", "g0", "g1")]

        def run(i: int) -> list[int]:  # both groups at once: steps batch only with their own group's body
            split, client = devices[i]
            link = client.open_session("float32")
            return generate(split, PROMPT, max_new_tokens=10, ignore_eos=True, link=link).token_ids

        assert in_threads(run, 4) == [expected] * 4
        for _, client in devices:
            client.close()
        g0 = manifest.groups["g0"]
        with pytest.raises(RemoteError, match=r"group_mismatch: user group 'g1'.*cannot use another group's body"):
            CloudClient(url, fingerprint=g0, group="g1")  # a g0 device that claims to be in g1
        with pytest.raises(RemoteError, match=r"unknown_group: this server has no user group 'g7'; it serves g0, g1"):
            CloudClient(url, fingerprint=g0, group="g7")
        with pytest.raises(RemoteError, match="model_mismatch"):  # the private checkpoint pairs with no group
            connect_device(url, path)
        with pytest.raises(RemoteError, match="bad_request: HELLO's group is a string"):
            CloudClient(url, fingerprint=g0, group=["g0"])  # type: ignore[arg-type]  # a hostile client's HELLO
        with pytest.raises(RemoteError, match="model_mismatch: this server serves user groups"):
            CloudClient(url, group="g0")  # no fingerprint: no way to tell its key
        with CloudClient(url, fingerprint=g0) as client:  # no group named: the fingerprint says which
            assert client.welcome["group"] == "g0" and client.welcome["fingerprint"] == g0


def test_a_tampered_tensor_a_missing_file_or_a_wrong_fingerprint_is_refused_by_name(private, tmp_path) -> None:
    path = private("llama")
    server, user = bundles(path, tmp_path, "1:4")
    read_manifest(server, "server")  # intact
    body_file = server / "bodies" / "g0" / "model.safetensors"
    state = load_file(str(body_file))
    name = "model.layers.2.mlp.down_proj.weight"
    state[name][0, 0] += 1e-3
    save_file(state, str(body_file), {"format": "pt"})
    with pytest.raises(ConfigError, match=rf"tensor '{name}' in model.safetensors does not match"):
        load_server_body(server)
    (user / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer\.json is listed in .* but missing"):
        UserBundle.open(user)
    # A manifest pointing the group at another fingerprint (to pair with another body) is caught by the key.
    server2, user2 = bundles(path, tmp_path / "b", "1:4")
    manifest = json.loads((user2 / MANIFEST).read_text())
    manifest["groups"]["g0"] = "0123456789abcdef"
    (user2 / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"pairs group 'g0' with fingerprint 0123456789abcdef, but key\.safetensors"):
        UserBundle.open(user2)
    save_file({"x": torch.zeros(1)}, str(server2 / "bodies" / "g0" / "extra.safetensors"))
    with pytest.raises(ConfigError, match=r"extra.safetensors is not listed"):
        read_manifest(server2)


def test_package_refuses_bad_input_naming_it(private, tmp_path) -> None:
    path = private("llama")
    with pytest.raises(ConfigError, match="layout 'stip' is not available"):
        package(path, "1:4", tmp_path / "s", tmp_path / "u", layout="stip")
    with pytest.raises(ConfigError, match="at least one user group"):
        package(path, "1:4", tmp_path / "s", tmp_path / "u", groups=0)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "old").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        package(path, "1:4", tmp_path / "s", tmp_path / "u")
    _server, user = bundles(path, tmp_path / "ok", "1:4")
    with pytest.raises(ConfigError, match="is a user bundle: it holds the head and tail only"):
        load_split(user, "1:4")
    with pytest.raises(ConfigError, match="is a user bundle, not a server bundle"):
        load_server_body(user)


@pytest.mark.smollm2
def test_smollm2_bundles_reproduce_the_model(tmp_path) -> None:
    from lambdasplit.models import resolve_checkpoint

    path = resolve_checkpoint("smollm2-135m-instruct", quiet=True)
    server, user = bundles(path, tmp_path, "2:28")
    device = UserBundle.open(user).protect(load_split(user, "2:28", parts=("head", "tail")))
    body = load_server_body(server)
    got, expected = split_logits(device, body), unsplit_logits(path)
    assert (got - expected).abs().max() < 1e-4  # measured 6.0e-5 (permutation and every inner secret, float32)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

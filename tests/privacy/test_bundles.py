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


def bundles(private_path: Path, tmp_path: Path, layers: str | None, **kwargs) -> tuple[Path, Path]:
    report = package(private_path, layers, tmp_path / "server", tmp_path / "users", seed=11, **kwargs)
    return report.server_out, report.user_out["g0"]


def bundle_split(private_path: Path, tmp_path: Path, layout: str, **kwargs) -> tuple[SplitModel, SplitModel]:
    """The device (from its user bundle, key in use) and the body (from the server bundle) of one layout."""
    layers = "1:4" if layout == "head-tail" else None
    server, user = bundles(private_path, tmp_path, layers, layout=layout, **kwargs)
    bundle = UserBundle.open(user)
    device = bundle.protect(load_split(user, bundle.manifest.points, parts=("head", "tail")))
    return device, load_server_body(server)


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
    device, body = bundle_split(path, tmp_path / "again", "head-tail", kind=kind)
    got, expected = split_logits(device, body), unsplit_logits(path)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["permutation", "rotation"])
def test_stip_layout_bundles_hold_the_embedding_or_everything_else_and_equal_the_private_model(
    private, tmp_path, family, kind
) -> None:
    path = private(family)
    inner = ("ffn", "kv-heads", "v-channels") if kind == "permutation" else ()
    server, user = bundles(path, tmp_path, None, layout="stip", kind=kind, inner=inner)
    assert read_manifest(server).points == "0:5" and read_manifest(user).layout == "stip"
    # The server: every layer, the final norm and the LM head (its own tensor: no embedding to tie it to).
    server_tensors = {n for names in tensors_of(server).values() for n in names}
    assert {"model.norm.weight", "lm_head.weight"} <= server_tensors
    assert {n.split(".")[2] for n in server_tensors if n.startswith("model.layers.")} == {"0", "1", "2", "3", "4"}
    assert not any(s in n for n in server_tensors for s in ("embed", "vocab", *SECRET_NAMES))
    # The user: the embedding alone, and the key with its vocabulary permutation.
    user_tensors = tensors_of(user)
    assert user_tensors["model.safetensors"] == ["model.embed_tokens.weight"]
    assert set(user_tensors["key.safetensors"]) <= {"matrix", "permutation", "vocab"}
    assert "vocab" in user_tensors["key.safetensors"]
    bundle = UserBundle.open(user)
    device = bundle.protect(load_split(user, parts=("head", "tail")))
    assert device.layout == "stip" and device.tail is None and device.head is not None
    assert device.head.num_layers == 0
    body = load_server_body(server)
    assert body.body is not None and body.body.output == "logits"
    # The cloud's logits are in a secret order: its argmax is not the private model's token.
    assert body.body is not None
    expected = unsplit_logits(path)
    embedded = bundle.key.encode(device.head(torch.tensor([PROMPT])))
    scrambled = body.body(embedded)[0]
    assert not torch.equal(scrambled.argmax(-1), expected[: len(PROMPT)].argmax(-1))
    got = split_logits(device, body)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_over_a_server_a_stip_user_bundle_gets_one_row_of_logits_per_prompt(private, tmp_path) -> None:
    path = private("qwen2")
    server, user = bundles(path, tmp_path, None, layout="stip")
    _, head_tail_user = bundles(path, tmp_path / "ht", "1:4")
    expected = generate(load_split(path, "1:4"), PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    with body_server("--model", str(server)) as url:
        split, client = connect_device(url, user)
        with client:
            assert client.welcome["output"] == "logits" and client.layers == (0, 5)
            link = client.open_session("float32")
            got = generate(split, PROMPT, max_new_tokens=10, ignore_eos=True, link=link)
            assert got.token_ids == expected
            # The prompt's FORWARD asks for its last row only: 10 RESULTs of one row of V float32 values each.
            assert link.traffic.down_payload_bytes == 10 * 320 * 4
            assert link.traffic.up_payload_bytes == (len(PROMPT) + 9) * 64 * 4
        with pytest.raises(RemoteError, match="model_mismatch"):  # a head/tail user bundle does not pair
            connect_device(url, head_tail_user)


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
    with pytest.raises(ConfigError, match="layout 'shuffle' is not available"):
        package(path, "1:4", tmp_path / "s", tmp_path / "u", layout="shuffle")
    with pytest.raises(ConfigError, match=r"STIP's layout puts every layer in the cloud \(--layers 0:5\), not 1:4"):
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
    expected = unsplit_logits(path)
    server, user = bundles(path, tmp_path, "2:28")
    device = UserBundle.open(user).protect(load_split(user, "2:28", parts=("head", "tail")))
    got = split_logits(device, load_server_body(server))
    # Permutation and every inner secret, float32, logits up to 33: measured 6.0e-5 with MKL's kernels, 1.3e-4 with
    # oneDNN's (models.packing, the default on a CPU): rounding in another order, nothing more.
    assert (got - expected).abs().max() < 3e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    device, body = bundle_split(path, tmp_path / "stip", "stip")
    got = split_logits(device, body)
    assert (got - expected).abs().max() < 3e-4  # STIP's layout: every layer, final norm and LM head transformed
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

"""The spec of PrivateLoRA's split: M = 0 is the base model; a split run over a real connection equals the whole
model with Delta W = A M B merged (1e-5), prefill and cached decode, on two families and two cuts; the split's
gradients for M equal plain autograd's on the merged computation."""

from __future__ import annotations

import copy

import pytest
import torch
from privatelora_helpers import LAYOUT, TIMEOUT, autograd_reference, random_adapters

from lambdasplit.generation import generate
from lambdasplit.privatelora import AdapterLink, AdapterServer, PrivateAdapters, SplitTrainer, merge_into
from lambdasplit.privatelora.training import next_token_loss
from lambdasplit.split import load_split

CUTS = {"llama": (0, 5), "qwen2": (1, 4)}  # the paper's cut (whole stack in the cloud) and a Λ-Split cut


@pytest.fixture(scope="module", params=sorted(CUTS))
def deployment(request, tiny_checkpoint):
    """(family's checkpoint, reference model, device split, server) for a family; the server over loopback."""
    family = request.param
    path, reference = tiny_checkpoint(family)
    cut = CUTS[family]
    device = load_split(path, cut, parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    cloud = load_split(path, cut, parts=("body",), device="cpu", dtype="float32", quiet=True)
    with AdapterServer(cloud, LAYOUT, timeout=TIMEOUT) as server:
        yield reference, device, server, range(*cut)


def split_logits(device, link: AdapterLink, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ids[:, :-steps] then decode the rest one token at a time through the KV caches: logits (1, T, V)."""
    tail_cache = device.tail.new_cache()
    head_cache = device.head.new_cache()
    cut = ids.shape[1] - steps
    pieces, position = [], 0
    for chunk in (ids[:, :cut], *ids[:, cut:].split(1, dim=1)):
        out = link.forward(device.head(chunk, head_cache), position)
        pieces.append(device.tail(out, tail_cache, logits_to_keep=0))
        position += chunk.shape[1]
    return torch.cat(pieces, dim=1)


def test_m_zero_gives_the_base_models_logits(deployment) -> None:
    reference, device, server, layers = deployment
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with AdapterLink(server.url, PrivateAdapters(LAYOUT, layers), timeout=TIMEOUT) as link:
        got = split_logits(device, link, ids, steps=3)
    with torch.no_grad():
        want = reference(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_split_run_equals_the_model_with_delta_w_merged(deployment) -> None:
    reference, device, server, layers = deployment
    adapters = random_adapters(LAYOUT, layers)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with AdapterLink(server.url, adapters, timeout=TIMEOUT) as link:
        got = split_logits(device, link, ids, steps=4)
        # one round trip per adapted layer and forward: q, k and v travel together
        assert link.exchanges == len(layers) * 5
    merged = merge_into(copy.deepcopy(reference), adapters)
    with torch.no_grad():
        want = merged(ids).logits
        base = reference(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2  # M changed the model: the equality above is not the base's


def test_generation_over_the_link_follows_the_merged_model(deployment) -> None:
    reference, device, server, layers = deployment
    adapters = random_adapters(LAYOUT, layers, seed=3)
    merged = merge_into(copy.deepcopy(reference), adapters)
    prompt = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        want = merged.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 4:].tolist()
    with AdapterLink(server.url, adapters, timeout=TIMEOUT) as link:
        got = generate(device, prompt[0].tolist(), max_new_tokens=6, link=link, ignore_eos=True)
    assert got.token_ids == want


def test_split_gradients_equal_plain_autograd(deployment) -> None:
    reference, device, server, layers = deployment
    adapters = random_adapters(LAYOUT, layers, seed=4, scale=0.2)
    ids = torch.randint(3, 300, (1, 11), generator=torch.Generator().manual_seed(5))
    model, leaves = autograd_reference(reference, adapters)
    next_token_loss(model(ids).logits, ids).backward()
    with AdapterLink(server.url, adapters, timeout=TIMEOUT) as link:
        trainer = SplitTrainer(device, adapters, link)
        loss = trainer.loss_and_grads(ids)
        # forward and backward: one round trip per adapted layer each
        assert link.exchanges == 2 * len(layers)
    assert adapters.pending == 0
    for index in layers:
        for target in LAYOUT.targets:
            got = adapters.matrix(index, target).grad
            want = leaves[f"{index}.{target}"].grad
            assert got is not None and want is not None and float(want.abs().max()) > 0
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(next_token_loss(model(ids).logits, ids)), abs=1e-5)


@pytest.mark.cuda
def test_a_gpu_body_serves_a_cpu_device(tiny_checkpoint) -> None:
    """The cloud on CUDA (A and B follow the body's device and dtype), the device and its M on the CPU."""
    path, reference = tiny_checkpoint("llama")
    device = load_split(path, (0, 5), parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    cloud = load_split(path, (0, 5), parts=("body",), device="cuda", dtype="float32", quiet=True)
    adapters = random_adapters(LAYOUT, range(5), seed=6)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(8))
    with AdapterServer(cloud, LAYOUT, timeout=TIMEOUT) as server, AdapterLink(server.url, adapters) as link:
        got = split_logits(device, link, ids, steps=2)
        loss = SplitTrainer(device, adapters, link).loss_and_grads(ids)
    merged = merge_into(copy.deepcopy(reference), adapters)
    with torch.no_grad():
        torch.testing.assert_close(got, merged(ids).logits, atol=1e-4, rtol=0)
    assert torch.isfinite(loss) and all(p.grad is not None for p in adapters.parameters())

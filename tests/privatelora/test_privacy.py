"""What a PrivateLoRA server holds, measured on a tiny Llama: at X = 0 the uplink is the embedding rows (a table
lookup gives the prompt), and the server's own exchanges give M by least squares once it has seen r_c2d rows."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from privatelora_helpers import LAYOUT, TIMEOUT, random_adapters

from lambdasplit.privatelora import AdapterLink, AdapterServer
from lambdasplit.split import load_split


@pytest.fixture(scope="module")
def deployment(tiny_checkpoint):
    path, reference = tiny_checkpoint("llama")
    device = load_split(path, (0, 5), parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    cloud = load_split(path, (0, 5), parts=("body",), device="cpu", dtype="float32", quiet=True)
    return reference, device, cloud


def test_a_curious_server_reads_the_prompt_and_fits_m_from_its_own_traffic(deployment) -> None:
    reference, device, cloud = deployment
    adapters = random_adapters(LAYOUT, range(5), seed=11)
    seen: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    uplink: list[torch.Tensor] = []

    def tap(layer: int, group: int, u: torch.Tensor, v: torch.Tensor) -> None:
        for i, target in enumerate(LAYOUT.groups()[group]):
            seen[(layer, target)].append((u[i, 0], v[i, 0]))

    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    with AdapterServer(cloud, LAYOUT, timeout=TIMEOUT, tap=tap) as server, AdapterLink(server.url, adapters) as link:
        hidden = device.head(ids)
        uplink.append(hidden[0])
        link.forward(hidden, 0)
    # X = 0: every row the server receives is a row of the public embedding matrix
    table = reference.get_input_embeddings().weight
    read = [int((table - row).abs().sum(dim=1).argmin()) for row in uplink[0]]
    assert read == ids[0].tolist()

    assert len(seen) == 5 * 3
    for (layer, target), pairs in seen.items():
        u = torch.cat([p[0] for p in pairs]).double()  # (12, r_c2d = 8)
        v = torch.cat([p[1] for p in pairs]).double()  # (12, r_d2c = 6)
        m = adapters.matrix(layer, target).detach().double()
        short = torch.linalg.lstsq(u[: LAYOUT.rank_c2d - 1], v[: LAYOUT.rank_c2d - 1], driver="gelsd").solution
        enough = torch.linalg.lstsq(u[: LAYOUT.rank_c2d], v[: LAYOUT.rank_c2d]).solution
        assert (short - m).norm() / m.norm() > 1e-2  # fewer rows than r_c2d: M is not determined yet
        assert (enough - m).norm() / m.norm() < 1e-4  # r_c2d rows: M, to float32 rounding

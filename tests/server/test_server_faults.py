"""A fault inside the body server (a bug, out of memory) while it serves a FORWARD: the device gets an ERROR frame
``internal`` naming it, the session's cache is as before the step, and the connection goes on serving."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lambdasplit.client import CloudClient
from lambdasplit.errors import RemoteError
from lambdasplit.server.app import BodyServer
from lambdasplit.server.settings import ServerSettings
from lambdasplit.split import load_split
from lambdasplit.split.state import BodyState
from servers import app_in_thread
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"
FAULTY_ROWS = 3  # a FORWARD of this many rows fails inside the body


@pytest.fixture
def faulty(tiny_checkpoint) -> Iterator[tuple[str, Any]]:
    """A body server in this process whose body raises on a 3-row forward; its URL and a fresh copy of the body."""
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, LAYERS, parts=["body"], device="cpu", dtype="float32")
    body = split.body
    assert body is not None
    forward = body.forward

    def failing(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden.shape[1] == FAULTY_ROWS:
            raise RuntimeError("injected fault")
        return forward(hidden, *args, **kwargs)

    body.forward = failing  # type: ignore[method-assign]
    server = BodyServer(split, ServerSettings(port=0, tls="off"))
    with app_in_thread(server.app) as port:
        yield f"ws://127.0.0.1:{port}/v1/split", load_split(path, LAYERS, parts=["body"], device="cpu").body


def test_a_fault_is_an_internal_error_and_the_session_goes_on(faulty) -> None:
    url, body = faulty
    local = BodyState(body)
    g = torch.Generator().manual_seed(0)
    with CloudClient(url) as client:
        link = client.open_session("float32")
        d = int(client.welcome["hidden_size"])
        prompt, bad, step = (torch.randn(1, n, d, generator=g) for n in (4, FAULTY_ROWS, 2))
        torch.testing.assert_close(link.forward(prompt, 0), local.forward(prompt, 0), atol=1e-5, rtol=1e-5)
        with pytest.raises(RemoteError) as failed:
            link.forward(bad, 4)
        assert failed.value.code == "internal" and "RuntimeError: injected fault" in str(failed.value)
        # The same session, at the same position: its cache holds the prompt only, as before the fault.
        torch.testing.assert_close(link.forward(step, 4), local.forward(step, 4), atol=1e-5, rtol=1e-5)
        assert not link.recoveries and client.reconnects == 0
        client.ping()

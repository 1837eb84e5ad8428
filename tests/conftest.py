"""Shared fixtures: tiny random models saved as real checkpoint folders (see tiny_models.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

# Before torch loads, as the CLI does (lambdasplit.cli.main): libgomp's idle threads otherwise spin after every
# parallel region, and the tests' own torch and the servers they start steal each other's cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The servers the tests start do not spin either (``cpus.openmp_waiting`` would have them spin about 1 ms after each
# forward): next to the tests' tiny models that is most of a step, and tests/server took 185 s with it against 156.
os.environ.setdefault("GOMP_SPINCOUNT", "0")
from lambdasplit.cpus import cpu_budget, thread_cap  # does not load torch

# A cgroup CPU quota caps torch's threads here as in the command line's servers, which tests compare bit for bit.
os.environ.update(thread_cap())

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lambdasplit.models.packing import memory_bytes
from tiny_models import NUM_LAYERS, build_tiny, make_tokenizer, random_norm_gains

#: What one worker of the suite may hold at its peak (measured: 6.6 GiB resident on a 2-core VM, SmolLM2 loaded by
#: several modules' fixtures; a "16 GB" machine, 15.6 GiB, runs two), and the most workers ``-n auto`` starts
#: (beyond that, servers and Ray clusters that tests start side by side would time out more than the cores gain).
WORKER_MEMORY_BYTES = 7 << 30
MAX_WORKERS = 8
# Each worker keeps torch's default threads, and the servers the tests start get the same count (servers.body_server
# passes --threads): tests that compare an image or a hidden state made here with one made by a server process bit
# for bit need the same thread count on both sides (with one thread per worker three of them differed by 1e-6 in
# float32).


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per CPU this process may use (``cpus.cpu_budget``: a cgroup CPU
    quota counts), as many as memory holds, at most ``MAX_WORKERS``; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides it,
    as with pytest-xdist's own rule."""
    if env := os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(env)
    cores = cpu_budget()
    memory, _ = memory_bytes()  # the machine's, or its container's limit
    by_memory = memory // WORKER_MEMORY_BYTES if memory else cores
    return max(1, min(cores, by_memory, MAX_WORKERS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` check the CUDA path; without a CUDA device they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def private_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every server it starts) keeps TLS state (a server's self-signed certificate, the
    device's known servers) in a folder of its own session, never in the user's ~/.local/state."""
    before = os.environ.get("LAMBDASPLIT_STATE")
    state = tmp_path_factory.mktemp("state")
    os.environ["LAMBDASPLIT_STATE"] = str(state)
    yield state
    if before is None:
        del os.environ["LAMBDASPLIT_STATE"]
    else:
        os.environ["LAMBDASPLIT_STATE"] = before


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test that runs a tiny model thousands of times in this process: its 64-wide
    matrices are too small to share, and with two threads every product waits on waking the other (PASSIVE)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[Path, PreTrainedModel]]:
    """``tiny_checkpoint(family)`` -> (checkpoint folder, the same model loaded unsplit as reference)."""
    cache: dict[str, tuple[Path, PreTrainedModel]] = {}

    def get(family: str) -> tuple[Path, PreTrainedModel]:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model = build_tiny(family)
            model.save_pretrained(path)
            make_tokenizer().save_pretrained(path)
            # The reference is read back from disk, exactly like the split, so both see the same weights.
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[family] = (path, ref)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def random_norms_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``random_norms_checkpoint(family)`` -> a tiny checkpoint folder whose norm gains are random, for transforms
    of the weights (all ones would hide a gain folded or permuted into the wrong place)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"norms-{family}")
            random_norm_gains(build_tiny(family), seed=7).save_pretrained(path)
            make_tokenizer().save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture(scope="session")
def llama_server(tiny_checkpoint: Callable[[str], tuple[Path, PreTrainedModel]]) -> Iterator[str]:
    """The URL of a plain body server (``serve --model TINY-LLAMA --layers 1:4``), started at first use and shared
    by every test that needs no other flags and leaves it running: each start of a server process costs seconds
    of imports. A test that kills, stops or configures its server starts its own."""
    from servers import body_server  # only sessions that start a server import the server package

    path, _ = tiny_checkpoint("llama")
    with body_server("--model", str(path), "--layers", f"1:{NUM_LAYERS - 1}") as url:
        yield url

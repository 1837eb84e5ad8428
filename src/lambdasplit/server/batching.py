"""Continuous batching: decode steps of different sessions that wait together run as one body forward.

The server submits every FORWARD here; whenever the compute thread is free the batcher takes everything
queued (up to ``max_batch``). Single-position steps of sessions with a cache run as one batch: each
session's keys and values are left-padded to the longest, an attention mask hides the padding, and
``position_ids`` give each row its own position, all through the model's own forward (nothing of HF's
attention is copied). The new position's keys and values are then appended to each session's own cache,
so sessions stay independent. Prompts, no-cache steps and multi-position (speculative) steps run one by
one, through ``BodyState.start`` like any other body step: a body whose sessions run on stage actors elsewhere
submits there and returns, so every such step is started before any is waited for, and sessions overlap on the
stages.

On a CPU, one forward over B rows reads the weights once instead of B times: that is the gain.
Only bodies whose layers are all full attention are batched (padding a sliding-window cache would need
the window's own bookkeeping); others run one step at a time, as before.

The batcher owns the one compute thread (``compute_thread``): torch already uses every core per forward, two at
once would only thrash. The server runs anything else that computes (warm-up, cloud-only generation, decoding and
encoding tensors) on it too.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lambdasplit.split.parts import Body
from lambdasplit.split.state import BodyState, cache_layers

T = TypeVar("T")
_UNDECODED = torch.empty(0)  # a job's hidden state until its ``decode`` runs


@dataclass
class Job:
    """One FORWARD waiting for the compute thread."""

    state: BodyState
    hidden: torch.Tensor  # (T, D)
    position: int
    reset: bool
    future: asyncio.Future[Any] = field(repr=False)
    last: bool = False  # the last row of the output only (a prompt's logits)
    tree: list[int] | None = None  # the rows' parents: a token tree's block (``split.tree``)
    decode: Callable[[], torch.Tensor] | None = None  # gives ``hidden``, on the compute thread (``Batcher.submit``)
    encode: Callable[[torch.Tensor], Any] | None = None  # what the future gets, made from the output on that thread

    @property
    def batchable(self) -> bool:
        single = self.hidden.shape[0] == 1 and self.tree is None
        return not self.reset and single and self.position > 0 and self.state.cache is not None


def full_attention_only(body: Body) -> bool:
    """Whether every layer of the body's cache is a plain full-attention layer (batchable)."""
    cache = body.new_cache()
    return cache is not None and all(type(layer) is DynamicLayer for layer in cache.layers)


def run_batched(body: Body, jobs: list[Job]) -> list[torch.Tensor]:
    """One body forward for single-position steps of several sessions; returns each session's (1, D) (or (1, V))."""
    for job in jobs:
        job.state.align(job.position)  # a session may have rolled back (rejected drafts)
    lengths = [job.position for job in jobs]
    longest = max(lengths)
    assert body.model is not None
    caches = []
    for job in jobs:
        assert job.state.cache is not None  # Job.batchable
        caches.append(cache_layers(job.state.cache))
    batch_cache = DynamicCache(config=body.model.config)
    for layer in range(body.num_layers):
        keys, values = [], []
        for held in (cache[layer] for cache in caches):
            assert held.keys is not None and held.values is not None  # position > 0: the prompt is in
            pad = (0, 0, longest - held.keys.shape[-2], 0)  # left-pad the position axis
            keys.append(F.pad(held.keys, pad))
            values.append(F.pad(held.values, pad))
        batch_cache.update(torch.cat(keys), torch.cat(values), layer)
    device = jobs[0].hidden.device
    mask = torch.zeros(len(jobs), longest + 1, dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        mask[i, longest - length :] = 1
    positions = torch.tensor(lengths, device=device).unsqueeze(1)
    hidden = torch.stack([job.hidden for job in jobs])  # (B, 1, D)
    out = body(hidden, batch_cache, attention_mask=mask, position_ids=positions)
    try:
        for layer, batched in enumerate(cache_layers(batch_cache)):
            assert batched.keys is not None and batched.values is not None
            new_keys, new_values = batched.keys[:, :, -1:, :], batched.values[:, :, -1:, :]
            for i, job in enumerate(jobs):
                assert job.state.cache is not None
                job.state.cache.update(new_keys[i : i + 1], new_values[i : i + 1], layer)
    except BaseException:
        # Some layers got the new position and some did not: put every session back where it was, so the
        # step can be retried (the client's replay does) and the cache stays one length across its layers.
        for job in jobs:
            job.state.undo(job.position)
        raise
    for job in jobs:
        job.state.advanced(1)
    return [out[i] for i in range(len(jobs))]


def compute_thread() -> ThreadPoolExecutor:
    """A new compute thread (an executor of one worker) for a body server.

    A server runs all its torch work on it: loading (``lambdasplit serve``), the warm-up, every step's decoding,
    forward and encoding (``Batcher.submit``), a TREE frame's keep. libgomp gives each thread that starts parallel
    regions a team of its own, and once its teams hold more threads than there are CPUs it spins only briefly before
    sleeping, whatever ``GOMP_SPINCOUNT`` says; then each of a forward's parallel regions wakes the sleeping thread
    again (``cpus.openmp_waiting``). Checked on 2 cores (SmolLM2 at 2:-2, the draft head's steps over an emulated
    wireless link, one run each): with the keep and the decoding on the event loop the server held two teams, and its
    compute took 60.8 ms a step spinning about 1 ms, 61.0 not spinning; with all of it here, 47.9 against 64.2."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lambdasplit-body")


class Batcher:
    """Queues jobs and runs them on its compute thread in batches, as soon as that thread is free."""

    def __init__(self, body: Body, max_batch: int, executor: ThreadPoolExecutor | None = None) -> None:
        self.body, self.max_batch = body, max_batch
        self.enabled = max_batch > 1 and full_attention_only(body)
        self.executor = executor or compute_thread()
        self._queue: list[Job] = []
        self._draining = False
        self.batches = 0  # batched forwards run
        self.batched_steps = 0  # steps that ran inside them
        self.compute_seconds = 0.0  # time in body forwards, batched or not

    @overload
    async def submit(
        self,
        state: BodyState,
        hidden: torch.Tensor | Callable[[], torch.Tensor],
        position: int,
        reset: bool,
        last: bool = False,
        *,
        tree: list[int] | None = None,
        encode: None = None,
    ) -> torch.Tensor: ...

    @overload
    async def submit(
        self,
        state: BodyState,
        hidden: torch.Tensor | Callable[[], torch.Tensor],
        position: int,
        reset: bool,
        last: bool = False,
        *,
        tree: list[int] | None = None,
        encode: Callable[[torch.Tensor], T],
    ) -> T: ...

    async def submit(
        self,
        state: BodyState,
        hidden: torch.Tensor | Callable[[], torch.Tensor],
        position: int,
        reset: bool,
        last: bool = False,
        *,
        tree: list[int] | None = None,
        encode: Callable[[torch.Tensor], Any] | None = None,
    ) -> Any:
        """The body's output (T, D) for ``hidden`` (T, D) at ``position`` of the session ``state`` ((T, V) from a
        body that ends in the LM head; one row with ``last``); ``tree``: the rows' parents (a token tree's block).

        ``hidden`` may be what decodes it, and ``encode`` what to make of the output (then the call returns what
        ``encode`` returns): both run on the compute thread, so a server's event loop never runs torch (see
        ``compute_thread``). An exception either raises is this call's.
        """
        decode: Callable[[], torch.Tensor] | None = None
        if not isinstance(hidden, torch.Tensor):
            decode = hidden
            hidden = _UNDECODED
        future = asyncio.get_running_loop().create_future()
        job = Job(state, hidden, position, reset, future, last, tree, decode, encode)
        self._queue.append(job)
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await job.future

    async def call(self, work: Callable[[], T]) -> T:
        """Run other compute (warm-up, a cloud-only generation step) on the compute thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    async def _drain(self) -> None:
        try:
            while self._queue:
                jobs, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                results: list[Any]
                try:
                    results = await self.call(functools.partial(self._run, jobs))
                except BaseException as exc:  # the executor itself failed: every job learns it
                    results = [exc] * len(jobs)
                for job, result in zip(jobs, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
        finally:
            self._draining = False

    def _run(self, jobs: list[Job]) -> list[Any]:
        """On the compute thread: the batchable jobs together, the others one by one."""
        results: dict[int, Any] = {}
        start = time.perf_counter()
        for job in jobs:
            if job.decode is not None:
                try:
                    job.hidden, job.decode = job.decode(), None
                except Exception as exc:
                    results[id(job)] = exc
        # Steps batch with steps on the same body only (a server of user groups holds one body per group).
        by_body: dict[int, list[Job]] = {}
        for job in jobs if self.enabled else []:
            if job.batchable and id(job) not in results:
                by_body.setdefault(id(job.state.body), []).append(job)
        for together in (group for group in by_body.values() if len(group) >= 2):
            try:
                outs = run_batched(together[0].state.body, together)
                results.update((id(job), out) for job, out in zip(together, outs, strict=True))
                self.batches += 1
                self.batched_steps += len(together)
            except Exception as exc:
                results.update((id(j), exc) for j in together)
        # The rest one by one: every step started (a chain of stage actors only submits it) before any is waited for,
        # except a second step of the same session, which starts after the first is done.
        started: list[tuple[Job, Callable[[], torch.Tensor]]] = []

        def finish_started() -> None:
            for job, finish in started:
                try:
                    results[id(job)] = finish()[0]
                except Exception as exc:
                    results[id(job)] = exc
            started.clear()

        for job in jobs:
            if id(job) in results:
                continue
            if any(other.state is job.state for other, _ in started):
                finish_started()
            try:  # (T, D) -> (1, T, D) -> (T, D)
                hidden = job.hidden.unsqueeze(0)
                started.append((job, job.state.start(hidden, job.position, job.reset, job.last, job.tree)))
            except Exception as exc:
                results[id(job)] = exc
        finish_started()
        for job in jobs:
            out = results[id(job)]
            if job.encode is not None and isinstance(out, torch.Tensor):
                try:
                    results[id(job)] = job.encode(out)
                except Exception as exc:
                    results[id(job)] = exc
        self.compute_seconds += time.perf_counter() - start
        return [results[id(j)] for j in jobs]

"""The planner's measured inputs: per-layer compute, the protocol's own per-step overhead, wire bytes, memory.

``measure_side`` times the real model's decoder layers in this process (a few warm-up runs, then medians):
forward hooks on every layer and on the embedding give each module's time; the rest of a forward call (masks,
rotary embedding, cache bookkeeping) is its ``forward_ms``, paid once per part. When the server is this machine,
its costs are measured the same way with its thread count: a stand-in, not the server's own figures.

``measure_overhead`` runs one short cached generation against a real ``lambdasplit serve`` on loopback with a
one-layer body, and takes the time per step that compute does not explain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel

from lambdasplit.bench.plan import Costs, SideCosts, Workload
from lambdasplit.config import parse_dtype
from lambdasplit.errors import ConfigError
from lambdasplit.lifetime import child_environment, watch_parent
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.split.parts import with_cache
from lambdasplit.wire import MessageType, WireDtype, encode_frame, tensor_frame

_LAYER = "model.layers."


def load_reference(path: Path) -> PreTrainedModel:
    """The unsplit model in float32 on the CPU (the benchmark's compute dtype)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Clock:
    """Forward hooks that add up each decoder layer's and the embedding's wall time in one forward call."""

    layers: float = 0.0
    embed: float = 0.0
    _start: float = 0.0

    def attach(self, model: PreTrainedModel) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        base = model.base_model
        modules: list[tuple[nn.Module, str]] = [(m, "layers") for m in base.layers]  # type: ignore[union-attr]
        modules.append((base.embed_tokens, "embed"))  # type: ignore[arg-type]
        for module, kind in modules:
            handles.append(module.register_forward_pre_hook(lambda *_: self._begin()))
            handles.append(module.register_forward_hook(lambda *_, k=kind: self._end(k)))
        return handles

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + time.perf_counter() - self._start)


def measure_side(
    model: PreTrainedModel,
    workload: Workload,
    *,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 16,
    source: str = "measured here",
) -> SideCosts:
    """Median per-layer and per-call costs of ``model`` at prefill (``workload.prompt_tokens``) and at decode with
    a KV cache of the prompt plus half the new tokens (the average context of a generation)."""
    base = model.base_model
    n_layers = len(base.layers)  # type: ignore[arg-type]
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, workload.prompt_tokens), generator=gen)
    clock = _Clock()
    handles = clock.attach(model)

    def forward(ids: torch.Tensor, cache: DynamicCache) -> tuple[float, float, float, float]:
        """One base-model forward: (layers, embed, rest of the call, norm + LM head + argmax), seconds."""
        clock.layers = clock.embed = 0.0
        start = time.perf_counter()
        hidden = base(input_ids=ids, use_cache=True, **with_cache(base, cache)).last_hidden_state
        total = time.perf_counter() - start
        start = time.perf_counter()
        model.lm_head(hidden[:, -1:]).argmax(-1)  # base already applied the final norm (timed in `rest`)
        head = time.perf_counter() - start
        return clock.layers, clock.embed, total - clock.layers - clock.embed, head

    try:
        with _threads(threads), torch.inference_mode():
            prefill: list[tuple[float, float, float, float]] = []
            for i in range(warmup + max(3, repeats // 4)):
                run = forward(prompt, DynamicCache())
                if i >= warmup:
                    prefill.append(run)
            cache = DynamicCache()
            forward(prompt, cache)
            for _ in range(workload.new_tokens // 2):  # grow the cache to the generation's average context
                forward(torch.randint(0, vocab, (1, 1), generator=gen), cache)
            decode = [forward(torch.randint(0, vocab, (1, 1), generator=gen), cache) for _ in range(warmup + repeats)]
            decode = decode[warmup:]
    finally:
        for handle in handles:
            handle.remove()

    def med(runs: list[tuple[float, float, float, float]], i: int) -> float:
        return statistics.median(r[i] for r in runs) * 1e3

    return SideCosts(
        layer_ms=med(decode, 0) / n_layers,
        forward_ms=med(decode, 2),
        layer_prefill_ms=med(prefill, 0) / n_layers,
        forward_prefill_ms=med(prefill, 2),
        ends_ms=med(decode, 1) + med(decode, 3),
        ends_prefill_ms=med(prefill, 1) + med(prefill, 3),
        source=f"{source}, {threads or torch.get_num_threads()} threads",
    )


def frame_bytes(hidden_size: int, wire_dtype: str, positions: int = 1) -> tuple[int, int]:
    """Socket bytes of one hidden-state message of ``positions`` rows: (device -> cloud, cloud -> device).

    A real frame is encoded (docs/wire-format.md); WebSocket adds 2, 4 or 10 bytes of header, and the
    client's frames 4 bytes of mask (RFC 6455)."""
    dtype = WireDtype.parse(wire_dtype)
    if not dtype.is_tensor:
        raise ConfigError(f"wire dtype {wire_dtype!r} carries no hidden state")
    hidden = torch.zeros(positions, hidden_size)
    n = len(encode_frame(tensor_frame(MessageType.FORWARD, hidden, dtype, 1, 0)))
    header = 2 if n < 126 else 4 if n < 65536 else 10
    return n + header + 4, n + header


def device_parameter_bytes(path: Path, head_layers: int, body_end: int, dtype: str = "float32") -> int:
    """Bytes of the device's weights: embedding, layers [0, X) and [Y, N), final norm and LM head, in ``dtype``;
    a tied LM head is the embedding (counted once). Read from the checkpoint's tensor shapes, nothing loaded."""
    checkpoint = Checkpoint(path)
    tied = bool(getattr(checkpoint.config, "tie_word_embeddings", False))
    itemsize = parse_dtype(dtype, torch.device("cpu")).itemsize
    total = 0
    for key, shape in _shapes(path).items():
        if key.startswith(_LAYER) or key.startswith(_LAYER.removeprefix("model.")):
            index = int(key.split(".")[2 if key.startswith("model.") else 1])
            if head_layers <= index < body_end:
                continue
        elif key.startswith("lm_head.") and tied:
            continue
        total += _numel(shape) * itemsize
    return total


def kv_cache_bytes(config: PretrainedConfig, layers: int, positions: int, dtype: str = "float32") -> int:
    """Keys and values of ``layers`` layers for ``positions`` positions."""
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return 2 * layers * heads * head_dim * positions * parse_dtype(dtype, torch.device("cpu")).itemsize


def _numel(shape: list[int] | torch.Size) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _shapes(path: Path) -> dict[str, list[int]]:
    files = sorted(path.glob("*.safetensors"))
    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = list(f.get_slice(key).get_shape())
    if not files:
        for file in sorted(path.glob("pytorch_model*.bin")):
            state = torch.load(file, map_location="meta", weights_only=True)
            shapes.update({k: list(v.shape) for k, v in state.items()})
    if not shapes:
        raise ConfigError(f"{path} holds no safetensors or pytorch_model.bin weights to size")
    return shapes


def measure_costs(
    path: Path,
    workload: Workload,
    *,
    device_threads: int | None,
    server_threads: int | None,
    repeats: int = 16,
    server: bool = True,
) -> Costs:
    """The device's costs measured in this process; the server's in a process of its own with the server's
    environment and threads (``serve`` runs torch with ``OMP_WAIT_POLICY=PASSIVE``; a second thread of this
    process would spin instead), a stand-in when the server is this machine. No overhead yet.

    ``server=False`` skips the server's measurement: its costs are the device's (to be scaled to given figures)."""
    model = load_reference(path)
    device = measure_side(model, workload, threads=device_threads, repeats=repeats)
    del model
    if not server:
        return Costs(device, device)
    return Costs(device, measure_side_in_process(path, workload, threads=server_threads, repeats=repeats))


def measure_side_in_process(path: Path, workload: Workload, *, threads: int | None, repeats: int = 16) -> SideCosts:
    """``measure_side`` in a fresh ``python`` with the body server's environment; its figures come back as JSON."""
    argv = [sys.executable, "-m", "lambdasplit.bench.profile", str(path), str(workload.prompt_tokens),
            str(workload.new_tokens), str(threads or 0), str(repeats)]  # fmt: skip
    env = child_environment() | {"OMP_WAIT_POLICY": "PASSIVE"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, check=True)
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"measuring the server's layers failed: {exc.stderr.strip()[-800:]}") from exc
    costs = json.loads(done.stdout.strip().splitlines()[-1])
    costs["source"] = "measured here as the server's stand-in, " + costs["source"].split(", ")[-1]
    return SideCosts(**costs)


def _main() -> None:
    watch_parent()  # a child of measure_side_in_process: it ends with its parent
    path, prompt_tokens, new_tokens, threads, repeats = sys.argv[1:6]
    side = measure_side(
        load_reference(Path(path)),
        Workload(int(prompt_tokens), int(new_tokens)),
        threads=int(threads) or None,
        repeats=int(repeats),
    )
    print(json.dumps(dataclasses.asdict(side)))


def measure_overhead(
    model: str,
    workload: Workload,
    *,
    wire_dtype: str = "float16",
    device_threads: int | None = None,
    server_threads: int | None = None,
    prompt: str = "What is the difference between AI, ML and DL?",
    runs: int = 3,
) -> float:
    """Milliseconds per round trip that compute does not explain, on loopback (RTT 0, no rate limit).

    A real ``lambdasplit serve`` with a one-layer body and cached generations of ``workload.new_tokens`` tokens: the
    time the device waited on the link, minus the server's own compute time (its /metrics), per message. What lands
    here is framing, sockets, the server's event loop and scheduler. Subtracting the server's own count, not a
    prediction, keeps this figure free of the layer timings' noise. The median of ``runs`` after one warm-up."""
    from lambdasplit.client import connect_device
    from lambdasplit.generation import SamplingParams, stream
    from lambdasplit.models.resolve import resolve_checkpoint
    from lambdasplit.server.process import body_server_process
    from lambdasplit.tls import TlsTrust

    n = int(Checkpoint(resolve_checkpoint(model, quiet=True)).config.num_hidden_layers)
    x = n // 2
    token = secrets.token_urlsafe(16)
    argv = ["--model", model, "--host", "127.0.0.1", "--insecure", "--layers", f"{x}:{x + 1}"]
    if server_threads is not None:
        argv += ["--threads", str(server_threads)]
    params = SamplingParams(max_new_tokens=workload.new_tokens, ignore_eos=True)
    per_message: list[float] = []
    with _threads(device_threads), body_server_process(argv, token=token, env={"OMP_WAIT_POLICY": "PASSIVE"}) as url:
        split, client = connect_device(url, model, token=token, quiet=True, trust=TlsTrust(insecure=True))
        with client:
            for i in range(runs + 1):
                before = _server_compute_seconds(url, token)
                link = client.open_session(wire_dtype)
                run = stream(split, prompt, chat=True, link=link, use_cache=True, params=params)
                for _event in run:
                    pass
                compute = _server_compute_seconds(url, token) - before
                assert run.result is not None
                traffic = run.result.traffic
                if i > 0:  # the first run warms both processes up
                    per_message.append((traffic.seconds - compute) / max(traffic.messages, 1))
    return max(statistics.median(per_message) * 1e3, 0.0)


def _server_compute_seconds(url: str, token: str) -> float:
    metrics = url.replace("ws://", "http://").removesuffix("/v1/split") + "/metrics"
    request = urllib.request.Request(metrics, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return float(json.load(response)["compute_seconds"])


if __name__ == "__main__":
    _main()

"""The paper's Table I for any causal LM, measured: cloud-only, Λ-Split without and with caching, local-only.

Λ-Split (section III-C) compares, for 300 new tokens of Llama 2 7B: the cloud-only service (text goes up,
text comes down), the split with and without its caching mechanism at three local:cloud layer ratios,
and local-only inference, by traffic, latency split into communication / local / cloud compute, and
tokens/s. ``run_table`` produces the same rows for a model and a list of links, every figure measured:

- traffic at the client socket (Linux TCP_INFO), at the server socket (``ss``, the kernel's count for the
  server's end) and, with ``capture_dir``, IP-level bytes from a tcpdump pcap (the paper's method), with the
  pcap's payloads rendered as text beside it (``capture_text``: the prompt in the clear, or only numbers);
- latency: ``total`` is the device's wall clock from the prompt to the last token; ``cloud`` is the server's
  own compute time (its /metrics); ``communication`` is the time the device waited on the link minus
  ``cloud`` (serialisation, transfer and propagation); ``local`` is the rest (head, tail, sampling).

Each split row runs against a ``lambdasplit serve`` subprocess; on an emulated link that server runs in a
network namespace behind a shaped veth pair (``links.open_link``). The cloud-only row uses
``serve --cloud-only``; local-only runs the unsplit model in this process and opens no connection.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lambdasplit.bench.capture import IpBytes, capture, capture_unavailable, pcap_bytes, server_socket_bytes
from lambdasplit.bench.capture_text import write_capture_text
from lambdasplit.bench.cpulimit import CpuLimit
from lambdasplit.bench.links import Link, LinkEndpoints, netns_unavailable, open_link
from lambdasplit.client import CloudClient, SocketBytes, connect_device
from lambdasplit.config import SplitPoints
from lambdasplit.errors import ConfigError
from lambdasplit.generation import DraftLength, Generation, ModelDecoder, SamplingParams, make_drafter, stream
from lambdasplit.generation.drafting import check_drafter_name
from lambdasplit.generation.text import encode_prompt
from lambdasplit.models import DEFAULT_MODEL
from lambdasplit.models.checkpoint import Checkpoint
from lambdasplit.models.resolve import resolve_checkpoint
from lambdasplit.server.process import body_server_process
from lambdasplit.split import SplitModel, load_split
from lambdasplit.tls import TlsTrust

#: The benchmark's servers serve plain ws:// on private emulated links (see ``_server``); the device agrees.
_PLAIN = TlsTrust(insecure=True)

#: The paper's Table I prompt (14 tokens for Llama 2).
PAPER_PROMPT = "What is the difference between AI, ML and DL?"
METHODS = ("cloud-only", "no-cache", "cache", "local-only")
_LABELS = {
    "cloud-only": "Cloud-only",
    "no-cache": "Λ-Split w/o caching",
    "cache": "Λ-Split w/ caching",
    "local-only": "Local-only",
}
_SENT = {"cloud-only": "text", "no-cache": "hidden state", "cache": "latest hidden state", "local-only": "-"}


@dataclass(frozen=True)
class TableConfig:
    """What to measure. ``local_layers`` are the device's layer counts, split evenly between head and tail."""

    model: str = DEFAULT_MODEL
    prompt: str = PAPER_PROMPT
    new_tokens: int = 300
    local_layers: tuple[int, ...] = (2, 8, 16)
    methods: tuple[str, ...] = METHODS
    wire_dtype: str = "float16"
    #: CPU threads of this (device) process, to emulate a weaker device; None keeps torch's default.
    device_threads: int | None = None
    #: CPU time of this (device) process while it generates, in CPUs (e.g. 0.25), via a cgroup quota.
    device_cpus: float | None = None
    #: CPU threads of the server process; None keeps torch's default.
    cloud_threads: int | None = None
    #: Record a pcap per row here, and beside it the text its payloads show (needs tcpdump and root).
    capture_dir: Path | None = None
    #: Drafters (``lookup``, ``self``): each adds a cached split row with speculative steps per ratio.
    speculative: tuple[str, ...] = ()
    #: Tokens drafted per step at first (then adapted).
    draft_tokens: int = 4
    #: Stop at the model's end-of-sequence token (the paper's L_out = 300 ignores it; copy tasks end by it).
    stop_at_eos: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ConfigError(f"methods must be among {', '.join(METHODS)}; got {sorted(unknown) or 'none'}")
        if self.new_tokens < 2:
            raise ConfigError("new_tokens must be at least 2 (one prefill and one decode step)")
        for n in (self.device_threads, self.cloud_threads):
            if n is not None and n < 1:
                raise ConfigError(f"thread counts must be >= 1, got {n}")
        if self.device_cpus is not None and not self.device_cpus > 0:
            raise ConfigError(f"device_cpus must be > 0, got {self.device_cpus}")
        for drafter in self.speculative:
            check_drafter_name(drafter)
        if self.speculative and "cache" not in self.methods:
            raise ConfigError("speculative rows are cached split rows: keep the 'cache' method")
        DraftLength(k=self.draft_tokens)  # validates the range


@dataclass
class Row:
    """One row of the table: one method (and ratio) on one link."""

    link: str
    method: str
    ratio: str  # local:cloud layers, as the paper writes it
    layers: list[int] | None  # [X, Y] for split rows
    transmitted: str
    new_tokens: int = 0
    text: str = ""
    same_text_as_local: bool | None = None
    # Bytes during the request (the connection itself is opened beforehand, as an app keeps it open).
    client_up: int = 0  # TCP payload at the device's socket
    client_down: int = 0
    server_up: int | None = None  # TCP payload at the server's socket (received)
    server_down: int | None = None  # (sent)
    frame_up: int = 0  # application messages (lambdasplit frames), headers included
    frame_down: int = 0
    payload_up: int = 0  # hidden-state tensor bytes alone
    payload_down: int = 0
    pcap_up: int | None = None  # IP-level bytes from the capture
    pcap_down: int | None = None
    # Per decode step (after the prompt), the paper's "latest part of hidden state".
    step_client_up: float | None = None
    step_client_down: float | None = None
    step_payload: float | None = None
    # Latency (seconds).
    communication_s: float = 0.0
    local_s: float = 0.0
    cloud_s: float = 0.0
    total_s: float = 0.0
    # Speculative rows: the drafter, decode steps (round trips after the prompt), drafted and accepted tokens.
    drafter: str | None = None
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def label(self) -> str:
        return _LABELS[self.method] + (f" + {self.drafter} drafts" if self.drafter else "")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_step(self) -> float | None:
        """New tokens per round trip, the prompt's included (1.0 without drafts)."""
        return self.new_tokens / (self.steps + 1) if self.steps or self.new_tokens else None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "label": self.label,
            "tokens_per_second": round(self.tokens_per_second, 3),
            "acceptance_rate": self.acceptance_rate,
        }


@dataclass
class TableResult:
    config: TableConfig
    links: list[Link]
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # link name -> why it did not run
    machine: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config) | {"capture_dir": str(self.config.capture_dir) if self.config.capture_dir else None}
        return {
            "config": cfg,
            "prompt_tokens": self.prompt_tokens,
            "machine": self.machine,
            "links": [asdict(link) for link in self.links],
            "skipped": self.skipped,
            "rows": [r.to_dict() for r in self.rows],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


#: Called with (link, row label, tokens done, tokens total) as a row progresses.
Progress = Callable[[str, str, int, int], None]


def machine_info(config: TableConfig) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "device_threads": torch.get_num_threads(),
        "device_cpus": config.device_cpus or "not limited",
        "cloud_threads": config.cloud_threads or "torch default",
    }


def run_table(config: TableConfig, links: list[Link], progress: Progress | None = None) -> TableResult:
    """Measure every method of ``config`` on every link; links that cannot be emulated here are skipped."""
    if config.capture_dir is not None:
        if reason := capture_unavailable():
            raise ConfigError(f"--capture: {reason}")
        config.capture_dir.mkdir(parents=True, exist_ok=True)
    if config.device_threads is not None:
        torch.set_num_threads(config.device_threads)
    report = progress or (lambda *_: None)
    with CpuLimit(config.device_cpus) if config.device_cpus else nullcontext() as limit:
        return _run_table(config, links, report, limit)


def _run_table(config: TableConfig, links: list[Link], report: Progress, limit: CpuLimit | None) -> TableResult:
    result = TableResult(config, links, machine=machine_info(config))
    path = resolve_checkpoint(config.model, quiet=True)
    num_layers = int(Checkpoint(path).config.num_hidden_layers)
    ratios = [SplitPoints.balanced(num_layers, n) for n in config.local_layers]

    tokenizer = AutoTokenizer.from_pretrained(path)
    result.prompt_tokens = len(encode_prompt(tokenizer, config.prompt, chat=True))
    local_text: str | None = None
    if "local-only" in config.methods:
        # Local-only does not depend on the link: measured once, listed under every link.
        local_row = _local_only(config, path, report, limit)
        local_text = local_row.text
    for link in links:
        if link.emulated and (reason := netns_unavailable()):
            result.skipped[link.name] = reason  # said, not faked
            continue
        with open_link(link) as ends:
            rows = _link_rows(config, ends, ratios, report, limit)
        if "local-only" in config.methods:
            rows.append(Row(**{**asdict(local_row), "link": link.name}))
        for row in rows:
            if local_text is not None:
                row.same_text_as_local = row.text == local_text
        result.rows.extend(rows)
    return result


def _params(config: TableConfig) -> SamplingParams:
    # Greedy and, unless stop_at_eos, always exactly new_tokens tokens, as the paper's L_out = 300.
    return SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=not config.stop_at_eos)


def _local_only(config: TableConfig, path: Path, report: Progress, limit: CpuLimit | None) -> Row:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    # The split rows' loop (stream), driving the unsplit model: the ends without layers (0:N) bring the tokenizer
    # and EOS ids the same way, for the cost of the embedding and LM head loaded twice.
    ends = load_split(path, f"0:{n}", parts=("head", "tail"), device="cpu", dtype="float32", quiet=True)
    row = Row("", "local-only", f"{n}:0", None, _SENT["local-only"])
    decoder = ModelDecoder(model)
    run = stream(ends, config.prompt, chat=True, params=_params(config), decoder=decoder)
    with limit.applied() if limit else nullcontext():
        _drive(run, row, "all", report)
    decoder.close()
    assert run.result is not None
    row.local_s = row.total_s = run.result.seconds
    return row


def _drive(
    run: Generation, row: Row, link: str, report: Progress, on_token: Callable[[int], None] | None = None
) -> None:
    total = run.params.max_new_tokens
    for event in run:
        if event.token_id is None:
            continue
        row.new_tokens += 1
        if on_token is not None:
            on_token(row.new_tokens)
        report(link, f"{row.label} {row.ratio}", row.new_tokens, total)
    assert run.result is not None
    row.text = run.result.text


def _link_rows(
    config: TableConfig, ends: LinkEndpoints, ratios: list[SplitPoints], report: Progress, limit: CpuLimit | None
) -> list[Row]:
    rows: list[Row] = []
    split_methods = [m for m in ("no-cache", "cache") if m in config.methods]
    if "cloud-only" in config.methods:
        with _server(config, ends, ["--cloud-only"]) as server:
            rows.append(_cloud_only(config, server, report))
    for points in ratios if split_methods else []:
        layers = f"{points.head_layers}:{points.body_end}"
        with _server(config, ends, ["--layers", layers]) as server:
            split, client = connect_device(server.url, config.model, token=server.token, quiet=True, trust=_PLAIN)
            with client:
                for method in split_methods:
                    rows.append(_split_row(config, server, split, client, method, report, limit))
                for drafter in config.speculative:
                    rows.append(_split_row(config, server, split, client, "cache", report, limit, drafter))
    return rows


@dataclass
class _Server:
    url: str
    token: str
    ends: LinkEndpoints
    capture_dir: Path | None

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    def compute_seconds(self) -> float:
        url = self.url.replace("ws://", "http://").removesuffix("/v1/split") + "/metrics"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return float(json.load(response)["compute_seconds"])

    def socket_bytes(self) -> tuple[int, int] | None:
        return server_socket_bytes(self.port, self.ends.cloud_netns)


@contextmanager
def _server(config: TableConfig, ends: LinkEndpoints, args: list[str]) -> Iterator[_Server]:
    token = secrets.token_urlsafe(16)
    # --insecure: Table I counts the protocol's own bytes, as the paper does, on a veth pair inside this machine
    # (beyond loopback the server would otherwise encrypt; TLS's own cost is in docs/benchmarks.md).
    argv = ["--model", config.model, "--host", ends.cloud_host, "--insecure", *args]
    if config.cloud_threads is not None:
        argv += ["--threads", str(config.cloud_threads)]
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads must not spin while the device computes
    with body_server_process(argv, token=token, timeout=300, env=env, wrap=ends.cloud_command) as url:
        yield _Server(url, token, ends, config.capture_dir)


@dataclass
class _Meter:
    """Socket, server and pcap counters around one request."""

    server: _Server
    client: CloudClient
    pcap: Path | None
    client_bytes: SocketBytes | None = None
    server_bytes: tuple[int, int] | None = None
    compute: float = 0.0

    def _settle(self) -> None:
        time.sleep(0.25 + self.server.ends.link.rtt_ms / 1e3)  # a delayed ACK (<= 200 ms) plus its crossing

    def start(self) -> None:
        self._settle()  # the device's delayed ACK of what came before, so the server's acked count is settled
        self.client_bytes = self.client.socket_bytes()
        self.server_bytes = self.server.socket_bytes()
        self.compute = self.server.compute_seconds()

    def stop(self, row: Row) -> None:
        # The device's delayed ACK of the last answer must arrive, so the server's acked count is final; then
        # both ends are read back to back (uvicorn's 20 s keep-alive pings would otherwise fall in between).
        self._settle()
        after = self.client.socket_bytes()
        if after is not None and self.client_bytes is not None:
            d = after - self.client_bytes
            row.client_up, row.client_down = d.sent, d.received
        server_after = self.server.socket_bytes()
        if server_after is not None and self.server_bytes is not None:
            row.server_down = server_after[0] - self.server_bytes[0]
            row.server_up = server_after[1] - self.server_bytes[1]

    def cloud_seconds(self, row: Row) -> None:
        """The server's compute for the row (an HTTP request of its own: read after the capture, not in it)."""
        row.cloud_s = self.server.compute_seconds() - self.compute


@contextmanager
def _measured(server: _Server, client: CloudClient, row: Row) -> Iterator[_Meter]:
    name = re.sub(r"[^\w.-]", "_", f"{row.link}-{row.method}-{row.ratio}") + ".pcap"
    pcap = server.capture_dir / name if server.capture_dir else None
    meter = _Meter(server, client, pcap)
    meter.start()
    # Whole packets (snaplen 0): IP bytes come from the headers, the readable NAME.txt beside it from the payloads.
    with capture(server.ends.device_iface, server.port, pcap, snaplen=0) if pcap else nullcontext():
        yield meter
        # Stop the counters before the capture ends, so both cover the same exchange.
        meter.stop(row)  # waits for the last ACK, which the capture then holds too
    meter.cloud_seconds(row)
    if pcap is not None:
        ip: IpBytes = pcap_bytes(pcap, server.port)
        row.pcap_up, row.pcap_down = ip.up, ip.down
        write_capture_text(pcap, server.port)  # what an eavesdropper reads: the prompt, or only numbers


def _cloud_only(config: TableConfig, server: _Server, report: Progress) -> Row:
    row = Row(server.ends.link.name, "cloud-only", "0:all", None, _SENT["cloud-only"])
    with CloudClient(server.url, token=server.token, trust=_PLAIN) as client, _measured(server, client, row):
        report(row.link, row.label, 0, config.new_tokens)
        frames_before = client.bytes_sent, client.bytes_received
        start = time.perf_counter()
        reply = client.generate_text(config.prompt, chat=True, **asdict(_params(config)))
        row.total_s = time.perf_counter() - start
        row.frame_up, row.frame_down = client.bytes_sent - frames_before[0], client.bytes_received - frames_before[1]
    row.text, row.new_tokens = reply.text, reply.new_tokens
    row.communication_s = max(row.total_s - row.cloud_s, 0.0)
    report(row.link, row.label, row.new_tokens, config.new_tokens)
    return row


def _split_row(
    config: TableConfig,
    server: _Server,
    split: SplitModel,
    client: CloudClient,
    method: str,
    report: Progress,
    limit: CpuLimit | None,
    drafter: str | None = None,
) -> Row:
    x, y = client.layers
    n = split.points.num_layers
    sent = _SENT[method] + (" (+ drafts)" if drafter else "")
    row = Row(server.ends.link.name, method, f"{n - (y - x)}:{y - x}", [x, y], sent, drafter=drafter)
    step: dict[str, Any] = {}
    with _measured(server, client, row):
        link = client.open_session(config.wire_dtype)
        draft = make_drafter(drafter, split, DraftLength(k=config.draft_tokens)) if drafter else None
        run = stream(
            split,
            config.prompt,
            chat=True,
            link=link,
            use_cache=method == "cache",
            params=_params(config),
            drafter=draft,
        )

        def count(n: int) -> None:
            # After the first token only the prompt has crossed; after the last, every step (and no CLOSE yet).
            if n == 1:
                step["socket"] = client.socket_bytes()
                step["traffic"] = (link.traffic.up_payload_bytes, link.traffic.messages)
            step["end"] = client.socket_bytes()

        with limit.applied() if limit else nullcontext():
            _drive(run, row, row.link, report, count)
    assert run.result is not None
    t = run.result.traffic
    row.steps, row.drafted, row.accepted = run.result.steps, run.result.drafted_tokens, run.result.accepted_tokens
    row.frame_up, row.frame_down = t.up_bytes, t.down_bytes
    row.payload_up, row.payload_down = t.up_payload_bytes, t.down_payload_bytes
    row.total_s = run.result.seconds
    row.communication_s = max(t.seconds - row.cloud_s, 0.0)
    row.local_s = max(row.total_s - t.seconds, 0.0)
    steps = t.messages - step["traffic"][1]
    if steps > 0 and step["socket"] is not None and step["end"] is not None:
        d = step["end"] - step["socket"]
        row.step_client_up, row.step_client_down = d.sent / steps, d.received / steps
        row.step_payload = (t.up_payload_bytes - step["traffic"][0]) / steps
    return row

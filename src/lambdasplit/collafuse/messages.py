"""CollaFuse's training messages: JSON control messages in text frames, a client's batch in one binary frame.

    client -> server  {"type": "join", "client", "fingerprint", "latent_shape", "context_shape"}
    server -> client  {"type": "welcome", "cut_ratio", "handoff", "rounds", "round", "batch", "clients"}
    server -> client  {"type": "round", "round", "loss"}            (the server triggers each round)
    client -> server  safetensors {x_t, noise, t, context}, metadata {"round": r}: its rows with t > t_c only
    server -> client  {"type": "done", "rounds"}  or  {"type": "error", "code", "message"}
    server -> client  {"type": "stopped", "round", "reason"}   (stopped early: every side checkpoints at round)

The batch is a safetensors file (no pickle; the server reads nothing but tensors and one metadata field). The
server checks every tensor before it trains: names, dtypes, shapes, the round, and that each t > t_c.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from lambdasplit.errors import WireError
from lambdasplit.syncws import control_type

#: Dtypes a batch's float tensors may travel in.
WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Batch:
    """A client's rows for the server in one round: noised latents, their noise, timesteps and contexts."""

    round: int
    x_t: torch.Tensor  # (n, C, h, w)
    noise: torch.Tensor  # (n, C, h, w)
    t: torch.Tensor  # (n,) int64
    context: torch.Tensor  # (n, L, D)

    def __len__(self) -> int:
        return len(self.t)

    def encode(self, dtype: torch.dtype = torch.float16) -> bytes:
        tensors = {
            "x_t": self.x_t.to(dtype).contiguous(),
            "noise": self.noise.to(dtype).contiguous(),
            "t": self.t.to(torch.int64).contiguous(),
            "context": self.context.to(dtype).contiguous(),
        }
        return save(tensors, metadata={"round": str(self.round)})


def decode_batch(
    raw: bytes | str,
    *,
    round: int,
    handoff: int,
    timesteps: int,
    latent_shape: tuple[int, ...],
    context_shape: tuple[int, ...],
    max_rows: int,
) -> Batch:
    """A client's batch, checked: a WireError (code ``bad_frame``, ``bad_round``, ``bad_shape``, ``bad_timestep``)
    names what is wrong."""
    if isinstance(raw, str):
        raise WireError(
            f"expected the round's batch (binary), got a text message of type {control_type(raw)!r}", code="bad_frame"
        )
    try:
        tensors = load(raw)
        metadata = _metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise WireError(f"the batch is not a safetensors file: {exc}", code="bad_frame") from None
    if set(tensors) != {"x_t", "noise", "t", "context"}:
        raise WireError(f"a batch holds x_t, noise, t and context, got {sorted(tensors)}", code="bad_frame")
    if metadata.get("round") != str(round):
        raise WireError(f"this is round {round}; the batch says round {metadata.get('round')!r}", code="bad_round")
    x_t, noise, t, context = tensors["x_t"], tensors["noise"], tensors["t"], tensors["context"]
    n = len(t)
    if t.dtype != torch.int64 or t.ndim != 1:
        raise WireError(f"t must be a 1-D int64 tensor, got {t.dtype} {list(t.shape)}", code="bad_frame")
    if n > max_rows:
        raise WireError(f"a client sends at most {max_rows} rows a round, got {n}", code="bad_shape")
    for name, tensor, shape in (
        ("x_t", x_t, latent_shape),
        ("noise", noise, latent_shape),
        ("context", context, context_shape),
    ):
        if tensor.dtype not in WIRE_DTYPES.values():
            raise WireError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}", code="bad_frame")
        if tuple(tensor.shape) != (n, *shape):
            raise WireError(
                f"{name} must be {[n, *shape]} (the U-Net's latent {list(latent_shape)}, the context "
                f"{list(context_shape)}), got {list(tensor.shape)}: another image size or model?",
                code="bad_shape",
            )
        if not bool(torch.isfinite(tensor).all()):
            raise WireError(f"{name} holds NaN or infinite values", code="bad_frame")
    if n and (int(t.min()) <= handoff or int(t.max()) >= timesteps):
        raise WireError(
            f"the server trains only on timesteps t_c < t < {timesteps} (t_c = {handoff}); got t in "
            f"[{int(t.min())}, {int(t.max())}]: the client keeps t <= t_c",
            code="bad_timestep",
        )
    return Batch(round, x_t, noise, t, context)


def _metadata(raw: bytes) -> dict[str, Any]:
    header = int.from_bytes(raw[:8], "little")
    return dict(json.loads(raw[8 : 8 + header]).get("__metadata__") or {})


def control(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def parse_control(raw: bytes | str, *expected: str) -> dict[str, Any]:
    """A JSON control message of one of the ``expected`` types; a server's error raises its coded WireError."""
    if not isinstance(raw, str):
        raise WireError(f"expected a {'/'.join(expected)} message, got {len(raw)} binary bytes", code="bad_frame")
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise WireError(f"expected a {'/'.join(expected)} message, got {raw[:80]!r}", code="bad_frame")
    if message.get("type") == "error" and "error" not in expected:
        raise WireError(str(message.get("message")), code=str(message.get("code", "bad_request")))
    if message.get("type") not in expected:
        raise WireError(f"expected a {'/'.join(expected)} message, got {message.get('type')!r}", code="bad_frame")
    return message

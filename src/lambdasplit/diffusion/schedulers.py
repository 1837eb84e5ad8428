"""Schedulers that two machines step in lockstep, and the state one hands to the other.

The cloud rebuilds the device's scheduler from its config (a diffusers scheduler class by name, never code), so
both step the same algorithm on the same dequantized noise and their latents stay equal. Lockstep (the paper and
unet-lambda policies) needs a deterministic step: DDPM, ancestral and SDE samplers draw fresh noise from the
device's generator at every step, so they are refused with a message naming a deterministic alternative.

CollaFuse hands over once and never steps in lockstep, so it takes a stochastic scheduler whose ``step`` takes a
``generator``: the device sends its CPU generator's state after drawing the initial latent
(`protocol.encode_generator`), the cloud draws its steps' noise from that stream and hands the state back with the
latent, and the device draws the rest, exactly as the unsplit pipeline's one generator would
(`require_reproducible`).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Protocol, cast

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lambdasplit.errors import ConfigError

_STOCHASTIC = {
    "DDPMScheduler",
    "EulerAncestralDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "CMStochasticIterativeScheduler",
}


class Scheduler(Protocol):
    """What lockstep stepping uses of a diffusers scheduler.

    Every diffusers scheduler subclasses both ``SchedulerMixin`` and ``ConfigMixin``, but neither declares
    ``set_timesteps``, ``step`` or ``timesteps`` (each scheduler class defines its own), so this says it.
    """

    config: Any  # a FrozenDict, read by attribute
    timesteps: torch.Tensor

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None: ...

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *, return_dict: bool = True
    ) -> Any: ...


def scheduler_from_config(config: dict[str, Any]) -> Scheduler:
    """A scheduler of the diffusers class named by ``config["_class_name"]``, built from ``config``."""
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"scheduler {name!r} is not a diffusers scheduler class")
    try:
        # from_config comes from ConfigMixin, which SchedulerMixin does not subclass (every scheduler class does).
        return cast(Scheduler, cast(Any, cls).from_config(config))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad {name} config: {exc}") from exc


def is_stochastic(scheduler: Scheduler) -> bool:
    """Whether ``scheduler``'s step draws fresh noise (DDPM, ancestral, SDE, DDIM with eta > 0, LCM, ...)."""
    name = type(scheduler).__name__
    algorithm = str(getattr(scheduler.config, "algorithm_type", ""))
    eta_noise = name == "DDIMScheduler" and float(getattr(scheduler.config, "eta", 0.0) or 0.0) > 0
    return name in _STOCHASTIC or algorithm.startswith("sde") or eta_noise


def takes_generator(scheduler: Scheduler) -> bool:
    """Whether ``scheduler.step`` takes a ``generator`` (as diffusers' ``prepare_extra_step_kwargs`` checks)."""
    return "generator" in inspect.signature(scheduler.step).parameters


def require_deterministic(scheduler: Scheduler, why: str) -> None:
    """Refuse a scheduler whose step draws noise: two machines could not step it in lockstep."""
    if is_stochastic(scheduler):
        raise ConfigError(
            f"{type(scheduler).__name__} draws fresh noise at every step, so {why} cannot keep device and cloud in "
            "lockstep; use a deterministic scheduler (DDIMScheduler, EulerDiscreteScheduler, "
            "DPMSolverMultistepScheduler, PNDMScheduler, ...) or the collafuse policy"
        )


def require_reproducible(scheduler: Scheduler, generator_shared: bool) -> None:
    """CollaFuse: refuse a stochastic scheduler unless both sides draw its noise from one shared generator stream.

    ``generator_shared``: the device sent its generator's state (SessionOptions.generator_state). A deterministic
    scheduler needs none; a stochastic one needs it, and a ``step`` that takes a generator to draw from it.
    """
    if not is_stochastic(scheduler):
        return
    name = type(scheduler).__name__
    if not takes_generator(scheduler):
        raise ConfigError(
            f"{name} draws fresh noise at every step but its step takes no generator, so the collafuse policy "
            "cannot reproduce it; use one whose step does (DDPMScheduler, EulerAncestralDiscreteScheduler, ...) "
            "or a deterministic scheduler"
        )
    if not generator_shared:
        raise ConfigError(
            f"{name} draws fresh noise at every step; the collafuse policy reproduces it only from the device "
            "generator's state (generator_state), which this session was not given"
        )


Scalar = int | float | bool | None


def _kind(value: Any) -> str | None:
    if value is None or isinstance(value, bool | int | float):
        return "scalar"
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, list) and all(v is None or isinstance(v, torch.Tensor) for v in value):
        return "tensors"
    return None


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def state_after_steps(stepped: Scheduler, fresh: Scheduler) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """What ``stepped`` holds that ``fresh`` (same config, same ``set_timesteps``) does not: the scheduler's state.

    Returns (spec, tensors): ``spec`` maps each changed attribute to a scalar, ``{"tensor": i}`` or
    ``{"tensors": [i or None, ...]}`` (indices into ``tensors``), small enough for a JSON frame; the tensors
    travel as tensor frames. Attributes of other types must not change (a ConfigError says which did).
    """
    spec: dict[str, Any] = {}
    tensors: list[torch.Tensor] = []
    for name, value in vars(stepped).items():
        if name in ("config", "_internal_dict") or _same(value, vars(fresh).get(name, object())):
            continue
        kind = _kind(value)
        if kind == "scalar":
            spec[name] = value
        elif kind == "tensor":
            spec[name] = {"tensor": len(tensors)}
            tensors.append(value)
        elif kind == "tensors":
            indices = []
            for v in value:
                indices.append(None if v is None else len(tensors))
                if v is not None:
                    tensors.append(v)
            spec[name] = {"tensors": indices}
        else:
            raise ConfigError(f"{type(stepped).__name__}.{name} ({type(value).__name__}) cannot be handed over")
    return spec, tensors


def apply_state(scheduler: Scheduler, spec: dict[str, Any], tensors: list[torch.Tensor]) -> None:
    """Set on ``scheduler`` (same config, same ``set_timesteps``) the state ``state_after_steps`` described."""
    known = vars(scheduler)
    for name, value in spec.items():
        if name not in known or name in ("config", "_internal_dict"):
            raise ConfigError(f"{type(scheduler).__name__} has no state attribute {name!r}")
        if isinstance(value, dict) and "tensor" in value:
            setattr(scheduler, name, _pick(tensors, value["tensor"]))
        elif isinstance(value, dict) and "tensors" in value:
            setattr(scheduler, name, [None if i is None else _pick(tensors, i) for i in value["tensors"]])
        elif value is None or isinstance(value, bool | int | float):
            setattr(scheduler, name, value)
        else:
            raise ConfigError(f"bad state value for {name!r}: {value!r}")


def _pick(tensors: list[torch.Tensor], index: Any) -> torch.Tensor:
    if not isinstance(index, int) or not 0 <= index < len(tensors):
        raise ConfigError(f"state names tensor {index!r}, but {len(tensors)} were sent")
    return tensors[index]


def twin(scheduler: Scheduler) -> Scheduler:
    """An independent copy (same config and timesteps, no shared state)."""
    return copy.deepcopy(scheduler)

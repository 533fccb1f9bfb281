"""Checks run before training starts, so a bad config fails in a second with a clear message.

- Sizes: a meta-batch, the validation and the test tasks, and the model (built on the ``meta`` device,
  which allocates nothing) must fit in this machine's memory; an absurd ``meta_batch``, ``shots``,
  ``dim`` or layer width is an error naming the key, not a crash of the allocator or of the machine.
- Images: the model's first convolution must take the tasks' channels, the images must be large enough
  for its downsampling, and a linear head must fit the features of its body, each checked on two blank
  images before the trial step, with an error naming the key to set (``task.size``, ``model.in_channels``,
  ``task.channels``, ``model.flat_features``).
- A trial meta-batch of one task (its own generator; RNG states restored; gradients discarded) runs the
  learner once, so a model that does not fit the tasks fails here with the learner's message.
Every failure is a :class:`~allmap.app.config.ConfigError`.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from allmap.app.build import FAMILIES, build_model
from allmap.app.config import MAX_STEPS, ConfigError
from allmap.learners.base import Learner

__all__ = [
    "check_device",
    "memory_limit",
    "task_bytes",
    "check_sizes",
    "check_model_size",
    "check_model_input",
    "trial_step",
]


def check_device(device: torch.device) -> None:
    """Raise if tensors cannot be made on ``device`` (e.g. ``cuda`` on a machine without a GPU)."""
    try:
        torch.empty(1, device=device)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"config key 'device': cannot use {str(device)!r} here ({first}). Use 'auto' (a GPU if "
            "there is one, else the CPU), 'cpu' or 'cuda'."
        ) from None
    if device.type == "meta":
        raise ConfigError("config key 'device': 'meta' tensors hold no data; use 'auto', 'cpu' or 'cuda'.")


def memory_limit() -> int:
    """Half of this machine's physical memory, in bytes (what one set of tensors may take)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        return 4 << 30


def task_bytes(family) -> int:
    """Bytes of one task of ``family`` (support and query, inputs and targets) as float32 / int64."""
    shots = family.shots if isinstance(family.shots, int) else max(family.shots)  # a range: its largest K
    examples = (shots + family.queries) * getattr(family, "ways", 1)
    x_numel = math.prod(getattr(family, "x_shape", None) or (family.x_dim,))
    y_bytes = 8 if family.classification else 4 * family.y_dim
    return examples * (4 * x_numel + y_bytes)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def check_sizes(config: dict[str, Any], families: dict[str, Any]) -> None:
    """Raise if a meta-batch or the evaluation tasks would not fit in memory."""
    limit = memory_limit()
    ev = config["eval"]
    wanted = [
        ("meta_batch", config["meta_batch"], families["train"]),
        ("eval.val_tasks", ev["val_tasks"], families["val"]),
        ("eval.tasks", ev["tasks"], families["test"]),
    ]
    for key, count, family in wanted:
        need = count * task_bytes(family)
        if need > limit:
            raise ConfigError(
                f"{key} = {count} tasks of {family!r} would take {_gib(need)}, more than half of this machine's "
                f"memory ({_gib(2 * limit)}). Lower {key} or the task's shots/queries/ways/size."
            )


def check_model_size(config: dict[str, Any]) -> None:
    """Raise if the model's parameters (with gradients and optimizer state, ~4 copies) would not fit."""
    with torch.device("meta"):
        model = build_model(config)
    numel = sum(p.numel() for p in model.parameters())
    need = 16 * numel
    if need > memory_limit():
        raise ConfigError(
            f"model {config['model']['name']!r} has {numel:,} parameters; with gradients and optimizer "
            f"state it would take about {_gib(need)}, more than half of this machine's memory. "
            "Make it smaller (model section)."
        )
    for key, value in config["learner"].items():
        if key.endswith(("steps", "iterations")) and isinstance(value, int) and value > MAX_STEPS:
            raise ConfigError(
                f"learner.{key} = {value} is more than {MAX_STEPS:,} inner steps per task; that is a "
                "typo, not a protocol. Lower it."
            )
    steps = config["learner"].get("inner_steps")
    # only plain reverse mode keeps every step's graph: first order, truncated, checkpointed, implicit
    # (iMAML) and Reptile do not, so this estimate would wrongly refuse them
    unrolled = config["learner"].get("hypergrad") in (None, "unrolled") and config["learner"]["name"] not in (
        "reptile",
        "imaml",
    )
    if isinstance(steps, int) and unrolled and not config["learner"].get("first_order", False):
        graph = 4 * numel * steps * config["meta_batch"]  # an unrolled step keeps at least one copy per task
        if graph > memory_limit():
            raise ConfigError(
                f"learner.inner_steps = {steps} unrolled over meta_batch = {config['meta_batch']} tasks "
                f"keeps at least {_gib(graph)} of adapted parameters, more than half of this machine's "
                "memory. Lower inner_steps or meta_batch, or use first_order: true."
            )


def _runs(net: nn.Module, channels: int, side: tuple[int, int]) -> Tensor | None:
    """``net``'s output on one blank ``channels x side`` image, or ``None`` if it raises."""
    try:
        with torch.no_grad():
            return net(torch.zeros(1, channels, *side))
    except Exception:
        return None


def _smallest_side(net: nn.Module, channels: int, start: int) -> int | None:
    """The smallest square side (above ``start``, up to 512) on which ``net`` runs, or ``None``."""
    hi = start
    while _runs(net, channels, (hi, hi)) is None:
        if hi >= 512:
            return None
        hi *= 2
    lo = start  # fails at lo, runs at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs(net, channels, (mid, mid)) is not None else (mid, hi)
    return hi


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_model_input(config: dict[str, Any], family) -> None:
    """Raise if the convolutional model of ``config`` cannot take the images of ``family``: other channels,
    too small for its downsampling, or a linear head sized for other images; the message names the key to
    set. The model is built on the CPU in eval mode with the RNG state restored; models without a
    ``Conv2d`` and families without images ``[C, H, W]`` are not checked here (the trial step still is)."""
    shape = tuple(getattr(family, "x_shape", ()) or ())
    if len(shape) != 3:
        return
    with torch.random.fork_rng(devices=[]):
        model = build_model(config).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return
    name, factory = config["model"]["name"], FAMILIES.get(config["task"]["family"])
    channels, side = shape[0], shape[1:]
    if convs[0].in_channels != channels:
        takes = convs[0].in_channels
        other = {1: "grey", 3: "RGB"}.get(takes)
        can_set = factory is not None and "channels" in inspect.signature(factory).parameters
        also = f", or task.channels: {takes} to read the images as {other}" if can_set and other else ""
        raise ConfigError(
            f"the task's images have {channels} channel(s) but model {name!r} takes {takes} "
            f"(model.in_channels); set model.in_channels: {channels}{also}."
        )
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape))
        return
    except Exception as err:
        failure = _first_line(err)
    body = getattr(model, "body", None)
    body = body if isinstance(body, nn.Module) else None
    features = _runs(body, channels, side) if body is not None else None
    head = getattr(model, "head", None)
    if features is not None and isinstance(head, nn.Linear) and features.shape[-1] != head.in_features:
        raise ConfigError(
            f"model {name!r}: on {side[0]}x{side[1]} images its body gives {features.shape[-1]} "
            f"features but its head takes {head.in_features}; set model.flat_features: "
            f"{features.shape[-1]}."
        )
    smallest = _smallest_side(body or model, channels, max(side)) if features is None else None
    if smallest is not None:
        raise ConfigError(
            f"the task's images are {side[0]}x{side[1]}, too small for model {name!r}: its "
            f"downsampling needs at least {smallest}x{smallest}. Raise task.size to {smallest} or more."
        )
    raise ConfigError(
        f"model {name!r} cannot take the task's images {list(shape)}: {failure}. Check the model "
        "section against task.size and task.channels."
    )


def trial_step(learner: Learner, family, device: torch.device) -> None:
    """Run one task through ``learner.meta_loss`` and back; raise a ConfigError naming what failed. The
    learner's buffers (state it carries, BatchNorm statistics) are as they were before."""
    buffers = [(b, b.clone()) for b in learner.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            tasks = family.sample(1, torch.Generator().manual_seed(0)).to(device)
            learner.meta_loss(tasks).backward()
        except ConfigError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"a trial meta-batch (one task of {family!r}) failed before training: {first}") from err
        finally:
            learner.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

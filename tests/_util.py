"""Helpers shared by test files (not collected: no test_ prefix)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

import allmap


def assert_vmap_equals_loop(learner: allmap.Learner, tasks: allmap.TaskBatch, grad_rtol: float = 1e-10) -> None:
    """``meta_loss`` and its meta-gradient are the same with tasks under ``vmap`` and in a per-task loop.

    Leaves ``learner.vectorize`` False.
    """
    results = []
    for vectorize in (True, False):
        learner.vectorize = vectorize
        learner.zero_grad()
        loss = learner.meta_loss(tasks)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in learner.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=1e-12)


def as_function(learner: allmap.Learner, tasks: allmap.TaskBatch):
    """``(f, params)``: the meta-loss as a function ``f(*params)`` of the learner's trainable meta-parameters
    (through ``torch.func.functional_call``), and detached copies of their current values, for ``gradcheck``."""
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    base = {n: p.detach() for n, p in learner.named_parameters()}

    def f(*params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(learner, {**base, **dict(zip(names, params))}, (tasks,))

    return f, tuple(base[n].clone().requires_grad_() for n in names)


GUIDE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
_BLOCK = re.compile(r"^```(\w+)[ \t]+file=(\S+)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def guide_files(path: Path = GUIDE) -> dict[str, tuple[str, int]]:
    """The fenced blocks of a guide marked ```` ```LANG file=NAME ````: ``NAME -> (text, first line)``."""
    text = path.read_text()
    return {m.group(2): (m.group(3), text.count("\n", 0, m.start(3)) + 1) for m in _BLOCK.finditer(text)}


def guide_module(file: str = "ridge_head.py", path: Path = GUIDE) -> types.ModuleType:
    """The guide's learner file as the module of its file name (once per process, like an import: its
    ``@allmap.register`` line runs once). Compiled against the guide itself, so a traceback names the line of
    docs/extending.md."""
    name = file.removesuffix(".py")
    if name not in sys.modules:
        code, first = guide_files(path)[file]
        module = types.ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module
        try:
            exec(compile("\n" * (first - 1) + code, str(path), "exec"), module.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


#: a run of two iterations, tested on four 2-way 1-shot tasks
TINY_RUN = {
    "iterations": 2,
    "meta_batch": 1,
    "log_every": 1,
    "checkpoint_every": 2,
    "eval": {
        "tasks": 4,
        "seed": 1000,
        "steps": [0],
        "ways": 2,
        "shots": 1,
        "queries": 1,
        "every": 2,
        "val_tasks": 2,
        "chunk": 100,
    },
}


def image_folder(root: Path, classes: list[str], per_class: int = 3, side: int = 28) -> Path:
    """A folder of one sub-folder of random RGB images per class."""
    rng = np.random.default_rng(len(classes))
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def imagefolder_config(tmp_path: Path, root: Path, **task) -> Path:
    """A run config (written to ``tmp_path``) of a tiny ProtoNet on 2-way 1-shot episodes of ``root``."""
    config = {
        **TINY_RUN,
        "task": {
            "family": "imagefolder",
            "root": str(root),
            "size": 28,
            "ways": 2,
            "shots": 1,
            "queries": 1,
            "cache_dir": str(tmp_path / "cache"),
            **task,
        },
        "model": {"name": "conv4", "in_channels": 3, "hidden": 4},
        "learner": {"name": "protonet"},
        "optimizer": {"name": "adam", "lr": 0.001},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path

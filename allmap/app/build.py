"""Registries of task families, models, learners and optimizers, and building them from a config.

A new component joins the CLI with one line in the matching registry. Section keys are checked against
the constructor's signature, so a misspelt key is an error that lists the valid ones.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from allmap.app.config import ConfigError
from allmap.app.schedules import CosineAdam, LinearSGD, StepDecayAdam
from allmap.app.typecheck import check_arguments
from allmap.learners import LEARNERS, Learner
from allmap.nets import MLP, ANMLNet, Conv4, MAMLConv, OMLConv
from allmap.tasks.families import FAMILIES

__all__ = [
    "FAMILIES",
    "MODELS",
    "LEARNERS",
    "OPTIMIZERS",
    "build_family",
    "check_validation_held_out",
    "build_model",
    "build_learner",
    "build_optimizer",
    "resolve_device",
    "check_disjoint",
    "check_held_out",
    "import_modules",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "conv4": Conv4,
    "mamlconv": MAMLConv,
    "omlconv": OMLConv,
    "anmlnet": ANMLNet,
}
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adam_step": StepDecayAdam,
    "adam_cosine": CosineAdam,
    "sgd_linear": LinearSGD,
}


def _call(
    kind: str, registry: dict[str, Callable[..., Any]], section: dict[str, Any], name_key: str, **extra: Any
) -> Any:
    name = section[name_key]
    if name not in registry:
        raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}.")
    factory = registry[name]
    kwargs = {k: v for k, v in section.items() if k != name_key}
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p not in ("self", "model", "params", "args", "kwargs")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown and not accepts_any:
        raise ConfigError(f"{kind} {name!r} has no option(s) {unknown}; valid options: {', '.join(valid)}.")
    kwargs = check_arguments(kind, name, factory, kwargs)
    try:
        return factory(**extra, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # anything a constructor raises on these values is a problem of the config
        raise ConfigError(
            f"{kind} {name!r}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from err


def import_modules(config: dict[str, Any]) -> None:
    """Import the modules listed in ``config['imports']``, so that the components they register (for example a
    learner under ``@allmap.register("name")``) are known before the config's names are resolved. A module
    imports once per process; a failure is a :class:`ConfigError` naming the module and what went wrong."""
    for name in config.get("imports") or []:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise ConfigError(f"imports: importing {name!r} failed: {err}") from err
            raise ConfigError(
                f"imports: no module named {name!r} on the Python path. Put the folder that holds {name}.py on "
                f"PYTHONPATH (e.g. `export PYTHONPATH=$PWD` in that folder) or install its package."
            ) from None
        except Exception as err:  # anything the module raises while it runs: its own error, with its name
            raise ConfigError(f"imports: importing {name!r} failed: {type(err).__name__}: {err}") from err


def build_family(config: dict[str, Any], split: str = "train"):
    """The task family of ``config['task']`` for ``split`` (train, val or test).

    Evaluation splits take ``eval.shots``/``eval.queries``/``eval.ways`` where set, then any task key of
    ``eval.task`` (for instance ``{within_alphabet: true, rotations: [0]}``: train with rotated copies as
    extra classes and across alphabets, test within one alphabet on the characters as drawn), and never the
    training augmentation (``shift``, ``rotate``, ``scale``); families with a ``split`` argument
    (class datasets) receive it, so test tasks come from held-out classes.
    """
    import_modules(config)
    section = dict(config["task"])
    if split != "train":
        for key in ("shots", "queries", "ways"):
            if config["eval"].get(key) is not None:
                section[key] = config["eval"][key]
        section.update(config["eval"]["task"])
        for key in ("shift", "rotate", "scale"):  # augmentation is for training episodes only
            section.pop(key, None)
    if _takes(FAMILIES.get(section["family"]), "split"):
        section.setdefault("split", split)
    return _call("task family", FAMILIES, section, "family")


def check_disjoint(train_family, test_family, phase: str = "test", hint: str | None = None) -> None:
    """Raise :class:`ConfigError` if ``test_family`` has classes (by name) that ``train_family`` trains on:
    evaluating a run on another protocol (``allmap eval RUN --set task.protocol=...``) must not score it on
    characters it has seen. ``phase`` names the held-out family in the message (``test`` or ``val``) and
    ``hint`` says which config keys to change. Families without class names (sinusoids, ...) are not checked."""
    names = [getattr(getattr(f, "data", None), "names", None) for f in (train_family, test_family)]
    if not all(names):
        return
    seen = set(names[1]) & set(names[0])
    if seen:
        what = "test" if phase == "test" else "validation"
        hint = hint or (
            "Evaluate with the run's own task.protocol / split, or train a run on the protocol you want to test."
        )
        raise ConfigError(
            f"the {what} classes overlap the classes this run was trained on ({len(seen)} of {len(names[1])}, "
            f"e.g. {sorted(seen)[0]!r}): its accuracy there would not measure few-shot learning. {hint}"
        )


def _held_out_hint(config: dict[str, Any], phase: str) -> str:
    """Which config keys give a run held-out ``phase`` classes."""
    task = config["task"]
    if "split" in task:
        return (
            f"task.split = {task['split']!r} gives every phase (train, val, test) the same classes; remove "
            "task.split, so that each phase reads its own classes."
        )
    if task["family"] == "omniglot":
        return f"Choose a task.protocol whose {phase} characters are held out of training (e.g. standard-holdout)."
    if task["family"] == "imagefolder":
        return (
            f"Change task.root: the class folders of {phase}/ must not repeat the names of those in train/ "
            "(or use a flat folder ROOT/CLASS/*.png, whose classes are split for you)."
        )
    return f"Change the task section so that the {phase} classes are not training classes."


def check_held_out(config: dict[str, Any], families: dict[str, Any]) -> None:
    """Raise :class:`ConfigError`, before training starts, if the test or validation classes of a run
    overlap its training classes (by name), naming the config keys to change. A validation family that
    says ``overlaps_training`` (Omniglot's protocols that validate on training characters, by design) may
    overlap; test classes never may."""
    for phase in ("test", "val"):
        if phase == "val" and getattr(families[phase], "overlaps_training", False):
            continue
        check_disjoint(families["train"], families[phase], phase, _held_out_hint(config, phase))


def check_validation_held_out(config: dict[str, Any], family: Any) -> None:
    """Raise :class:`ConfigError` before scoring a validation ``family`` whose classes the protocol trains on
    (``overlaps_training``): its accuracy would measure fitting, not few-shot learning."""
    if getattr(family, "overlaps_training", False):
        raise ConfigError(
            f"the validation classes of task.protocol {config['task'].get('protocol')!r} are part of its "
            "training side, so their accuracy measures fitting, not few-shot learning. Train with a protocol "
            "that holds them out (standard-holdout, lake-holdout, shuffled-holdout) to choose models on them."
        )


def _takes(factory: Callable[..., Any] | None, arg: str) -> bool:
    return factory is not None and arg in inspect.signature(factory).parameters


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of ``config['model']`` (build it under ``torch.device("meta")`` to size it for free)."""
    import_modules(config)
    return _call("model", MODELS, config["model"], "name")


def build_learner(config: dict[str, Any], family) -> Learner:
    """The learner of ``config['learner']`` around the model of ``config['model']`` (after importing the
    config's ``imports``, which may register it)."""
    model = build_model(config)
    section = dict(config["learner"])
    if section["name"] not in LEARNERS:
        raise ConfigError(
            f"unknown learner {section['name']!r}; known: {', '.join(sorted(LEARNERS))}. A learner of "
            "your own joins with @allmap.register(NAME) in a module listed under the config's "
            "'imports' key (see docs/extending.md)."
        )
    factory = LEARNERS[section["name"]]
    if _takes(factory, "loss"):
        section.setdefault("loss", "cross_entropy" if family.classification else "mse")
    for key, value in (("x_dim", family.x_dim), ("y_dim", family.y_dim)):
        if _takes(factory, key):
            section.setdefault(key, value)
    execution = section.pop("execution", None)  # how tasks run: see allmap.engine.execution
    learner = _call("learner", LEARNERS, section, "name", model=model)
    if execution is not None:
        try:
            learner.execution = execution
        except (TypeError, ValueError) as err:
            raise ConfigError(f"learner.execution: {err}") from err
    return learner


def build_optimizer(config: dict[str, Any], learner: Learner) -> torch.optim.Optimizer:
    """The meta-optimizer over ``learner.parameters()``."""
    return _call("optimizer", OPTIMIZERS, config["optimizer"], "name", params=learner.parameters())


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"config key 'device': {err}. Use 'auto', 'cpu' or 'cuda'.") from None

"""Run configurations: YAML files (presets ship in ``allmap/app/presets``), overrides and validation.

A config is a nested mapping. Top-level keys and their defaults are in :data:`DEFAULTS`; the sections
``task``, ``model``, ``learner`` and ``optimizer`` name a registered component (``family`` or ``name``)
and pass the remaining keys to its constructor, so their valid keys are the constructor's arguments.
Every key is checked before training starts; a wrong one is an error naming the valid ones. ``imports``
lists modules to import before those names are resolved, such as a file defining a learner registered with
``@allmap.register("name")`` (see docs/extending.md).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from allmap.app.averaging import is_decay

__all__ = ["DEFAULTS", "ConfigError", "load_config", "apply_overrides", "list_presets", "preset_path", "dump_config"]

DEFAULTS: dict[str, Any] = {
    "description": "",
    "imports": [],
    "seed": 0,
    "iterations": 1000,
    "meta_batch": 25,
    "device": "auto",
    "threads": None,
    "retain_memory": True,
    "log_every": 100,
    "checkpoint_every": 1000,
    "on_nonfinite": "raise",
    "ema": None,
    "task": {"family": "sinusoid"},
    "model": {"name": "mlp"},
    "learner": {"name": "maml"},
    "optimizer": {"name": "adam", "lr": 0.001},
    "eval": {
        "tasks": 600,
        "seed": 1000,
        "steps": [0, 1, 5, 10],
        "shots": None,
        "queries": None,
        "ways": None,
        "every": 1000,
        "val_tasks": 100,
        "chunk": 100,
    },
}

#: a sanity bound on inner-step counts (``eval.steps``, ``learner.inner_steps``): more is a typo, not a protocol.
MAX_STEPS = 100_000

_POSITIVE_INTS = ("iterations", "meta_batch", "log_every", "checkpoint_every")
_EVAL_POSITIVE_INTS = ("tasks", "every", "val_tasks", "chunk")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and what it accepts."""


def _presets_dir() -> Path:
    return Path(str(resources.files("allmap.app") / "presets"))


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description."""
    out = {}
    for path in sorted(_presets_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def preset_path(name: str) -> Path:
    """Path of a shipped preset, or a clear error listing the known ones."""
    path = _presets_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_presets())
        raise ConfigError(f"unknown preset {name!r}; known presets: {known}. Or pass the path of a YAML config file.")
    return path


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key in ("eval",):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over :data:`DEFAULTS`: keys a config (or an older run folder) leaves out get their defaults."""
    return _merge(DEFAULTS, data)


def load_config(preset_or_file: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a preset name or a YAML file, apply ``key=value`` overrides, fill defaults, and validate."""
    path = Path(preset_or_file)
    if not path.suffix and not path.exists():
        path = preset_path(str(preset_or_file))
    elif not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a preset name ({', '.join(list_presets())}) "
                          "or the path of a YAML file.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}.")
    config = with_defaults(data)
    config = apply_overrides(config, overrides or [])
    validate(config)
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings (values parsed as YAML: ``3``, ``0.1``, ``true``, ``[1, 2]``)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. iterations=200 or learner.inner_lr=0.1), got {item!r}.")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section of the config; sections are "
                                  f"{', '.join(k for k, v in config.items() if isinstance(v, dict))}.")
            node = node[part]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node[parts[-1]] = value
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_module_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def validate(config: dict[str, Any]) -> None:
    """Check top-level keys and value types; section keys are checked against constructors in ``build``."""
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid top-level keys: {', '.join(DEFAULTS)}.")
    for key in _POSITIVE_INTS:
        if not _is_int(config[key]) or config[key] < 1:
            raise ConfigError(f"config key {key!r} must be a positive integer, got {config[key]!r}.")
    missing = sorted(set(DEFAULTS) - set(config) - {"on_nonfinite", "ema", "imports"})
    if missing:
        raise ConfigError(f"config key(s) {missing} are missing; start from a preset (`allmap show NAME`).")
    ev = config["eval"]
    if not isinstance(ev, dict) or set(DEFAULTS["eval"]) - set(ev):
        raise ConfigError(f"config section 'eval' must be a mapping with keys {', '.join(DEFAULTS['eval'])}, got {ev!r}; "
                          "set single keys with --set eval.KEY=VALUE.")
    for key, value in (("seed", config["seed"]), ("eval.seed", ev["seed"])):
        if not _is_int(value) or not 0 <= value < 2**63 - 1:  # torch generators take 64-bit seeds
            raise ConfigError(f"config key {key!r} must be an integer in [0, 2**63), got {value!r}.")
    for section, name_key in (("task", "family"), ("model", "name"), ("learner", "name"), ("optimizer", "name")):
        if not isinstance(config[section], dict) or not isinstance(config[section].get(name_key), str):
            raise ConfigError(f"config section {section!r} must be a mapping with a {name_key!r} string, "
                              f"got {config[section]!r}.")
    unknown = sorted(set(ev) - set(DEFAULTS["eval"]))
    if unknown:
        raise ConfigError(f"unknown eval key(s) {unknown}; valid: {', '.join(DEFAULTS['eval'])}.")
    for key in _EVAL_POSITIVE_INTS:
        if not _is_int(ev[key]) or ev[key] < 1:
            raise ConfigError(f"config key 'eval.{key}' must be a positive integer, got {ev[key]!r}.")
    for key in ("shots", "queries", "ways"):
        if ev[key] is not None and (not _is_int(ev[key]) or ev[key] < 1):
            raise ConfigError(f"config key 'eval.{key}' must be a positive integer or null, got {ev[key]!r}.")
    steps = ev["steps"]
    if not isinstance(steps, list) or not steps or not all(_is_int(s) and 0 <= s <= MAX_STEPS for s in steps):
        raise ConfigError(f"config key 'eval.steps' must be a non-empty list of integers in [0, {MAX_STEPS}], got {steps!r}.")
    threads = config["threads"]
    if threads is not None and (not _is_int(threads) or not 1 <= threads <= 4096):
        raise ConfigError(f"config key 'threads' must be a positive integer or null (torch's default), got {threads!r}.")
    if not isinstance(config.get("retain_memory", True), bool):
        raise ConfigError(f"config key 'retain_memory' must be true (keep freed memory for reuse: faster, more RSS) "
                          f"or false (return it to the system), got {config['retain_memory']!r}.")
    if config.get("on_nonfinite", "raise") not in ("raise", "skip"):
        raise ConfigError(f"config key 'on_nonfinite' must be 'raise' (stop with an error naming the iteration) or "
                          f"'skip' (skip that meta-batch and count it in the metrics log), got {config['on_nonfinite']!r}.")
    imports = config.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(m, str) and _is_module_name(m) for m in imports):
        raise ConfigError(f"config key 'imports' must be a list of module names such as [my_learners] (modules "
                          f"imported before the config's names are resolved, e.g. to run their "
                          f"@allmap.register lines), got {imports!r}.")
    ema = config.get("ema")
    if ema is not None and not is_decay(ema):
        raise ConfigError(f"config key 'ema' must be null (evaluate the last weights) or a decay in (0, 1) such as "
                          f"0.998 (evaluate an exponential moving average of the weights over about "
                          f"1 / (1 - decay) steps), got {ema!r}.")
    if not isinstance(config["device"], str):
        raise ConfigError(f"config key 'device' must be a string such as 'auto', 'cpu' or 'cuda', got {config['device']!r}.")


def dump_config(config: dict[str, Any]) -> str:
    """The config as YAML text (written to the run folder)."""
    return yaml.safe_dump(config, sort_keys=False)

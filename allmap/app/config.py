"""Run configurations: YAML files (presets ship in ``allmap/app/presets``), overrides and validation.

A config is a nested mapping. Top-level keys and their defaults are in :data:`DEFAULTS`; the sections
``task``, ``model``, ``learner`` and ``optimizer`` name a registered component (``family`` or ``name``)
and pass the remaining keys to its constructor, so their valid keys are the constructor's arguments.
Every key is checked before training starts; a wrong one is an error naming the valid ones. ``imports``
lists modules to import before those names are resolved, such as a file defining a learner registered with
``@allmap.register("name")`` (see docs/extending.md).

Two keys are text for people: ``description``, one line of at most :data:`MAX_DESCRIPTION` characters that
``allmap presets`` lists (what it trains, on which protocol, the paper), and ``notes``, the full protocol in
words (split, ways, shots and queries, schedule, and why a setting differs from the paper), which
``allmap show`` prints with the rest of the config.

A config may start from a preset: ``base: PRESET_NAME`` makes it the deep merge of that preset (itself
resolved, so bases chain) with its own keys. Sections merge key by key, except that a ``task``, ``model``,
``learner``, ``optimizer`` or ``outer`` section naming another component than its base's replaces the base's
section (the keys are that component's constructor arguments and mean nothing to another one). ``description`` and
``notes`` are not inherited: they describe the config that states them, and a config with other settings
is another protocol.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from allmap.app.averaging import is_decay

__all__ = [
    "DEFAULTS",
    "MAX_DESCRIPTION",
    "ConfigError",
    "load_config",
    "read_yaml",
    "apply_overrides",
    "list_presets",
    "preset_path",
    "dump_config",
]

DEFAULTS: dict[str, Any] = {
    "description": "",
    "notes": "",
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
    "log": {"tensorboard": False},
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
        "val_steps": None,
        "chunk": 100,
        "task": {},
    },
}

#: a sanity bound on inner-step counts (``eval.steps``, ``learner.inner_steps``): more is a typo, not a protocol.
MAX_STEPS = 100_000

#: the longest ``description``: one line that fits a terminal next to the preset's name.
MAX_DESCRIPTION = 160

#: keys that describe the config stating them; a config naming a ``base`` does not inherit them.
TEXT_KEYS = ("description", "notes")

#: the sections that name a registered component, and the key that names it.
_COMPONENTS = {"task": "family", "model": "name", "learner": "name", "optimizer": "name", "outer": "name"}

_POSITIVE_INTS = ("iterations", "meta_batch", "log_every", "checkpoint_every")
_EVAL_POSITIVE_INTS = ("tasks", "every", "val_tasks", "chunk")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and what it accepts."""


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, line: int) -> None:
        super().__init__(key, first, line)
        self.key, self.first, self.line = key, first, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key twice (plain YAML keeps the last one silently,
    so a config that sets ``iterations`` twice would run with whichever came last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: keys written here override those
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader raises its own error for it
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a ``ConfigError`` naming the file if it is not valid YAML, or naming the
    key and its lines if one mapping sets a key twice."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no code runs
    except _DuplicateKey as dup:
        raise ConfigError(
            f"config file {str(path)!r} sets key {dup.key!r} twice (line {dup.first} and line "
            f"{dup.line}); keep one of them."
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}. Fix the file there "
            "(`allmap show PRESET` prints a valid config)."
        ) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what the YAML parser found and where (``expected ',' or ']' ... (line 3, column 1)``)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(err, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


def _presets_dir() -> Path:
    return Path(str(resources.files("allmap.app") / "presets"))


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description."""
    return {
        path.stem: str(_read_yaml(path).get("description") or "").strip()
        for path in sorted(_presets_dir().glob("*.yaml"))
    }


def preset_path(name: str) -> Path:
    """Path of a shipped preset, or a clear error listing the known ones."""
    path = _presets_dir() / f"{name}.yaml"
    if not path.is_file():
        known = list(list_presets())
        raise ConfigError(
            f"unknown preset {name!r}; {_did_you_mean(name, known)}known presets: {', '.join(known)}. "
            "Or pass the path of a YAML config file."
        )
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (:func:`read_yaml`), or a :class:`ConfigError` saying why it is not
    one."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}.")
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mappings merged key by key at every depth, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else copy.deepcopy(value)
    return out


def _inherit(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``own`` over ``base``; a component section naming another component than the base's replaces it."""
    merged = _deep_merge({k: v for k, v in base.items() if k not in TEXT_KEYS}, own)
    for section, name_key in _COMPONENTS.items():
        mine, theirs = own.get(section), base.get(section)
        if not (isinstance(mine, dict) and isinstance(theirs, dict)):
            continue
        if mine.get(name_key, theirs.get(name_key)) != theirs.get(name_key):
            merged[section] = copy.deepcopy(mine)
    return merged


def _resolve(data: dict[str, Any], chain: tuple[str, ...]) -> dict[str, Any]:
    """``data`` with its ``base`` preset (resolved in turn) merged in; ``chain`` names the configs being resolved."""
    own = {k: v for k, v in data.items() if k != "base"}
    if "base" not in data:
        return own
    base = data["base"]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{chain[-1]}: 'base' must name a preset ({', '.join(list_presets())}), got {base!r}.")
    if base in chain:
        loop = " -> ".join((*chain[chain.index(base) :], base))
        raise ConfigError(
            f"{chain[-1]}: 'base: {base}' makes a cycle ({loop}); a preset's bases must not lead back "
            "to it. Remove the 'base' key of one of them."
        )
    path = _presets_dir() / f"{base}.yaml"
    if not path.is_file():
        raise ConfigError(f"{chain[-1]}: 'base: {base}' is not a preset; known presets: {', '.join(list_presets())}.")
    return _inherit(_resolve(_read_yaml(path), (*chain, base)), own)


def _check_text(config: dict[str, Any]) -> None:
    """``description`` is one line of at most :data:`MAX_DESCRIPTION` characters; ``notes`` is a string."""
    desc = config["description"]
    if not isinstance(desc, str) or "\n" in desc.strip() or len(desc.strip()) > MAX_DESCRIPTION:
        got = (
            f"{len(desc.strip())} characters on {len(desc.strip().splitlines())} line(s)"
            if isinstance(desc, str)
            else repr(desc)
        )
        raise ConfigError(
            f"config key 'description' must be one line of at most {MAX_DESCRIPTION} characters (what "
            f"it trains, on which protocol, the paper), got {got}; put the full protocol in 'notes', a "
            "multi-line string that `allmap show` prints."
        )
    if not isinstance(config["notes"], str):
        raise ConfigError(f"config key 'notes' must be a string (the protocol in words), got {config['notes']!r}.")


def _did_you_mean(name: str, known: list[str]) -> str:
    """``did you mean 'x'? `` for the name in ``known`` closest to ``name`` (empty if none is close)."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key in ("eval", "log"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over :data:`DEFAULTS` (a ``kind: rl`` config over the meta-RL defaults): keys a config (or an
    older run folder) leaves out get their defaults."""
    if data.get("kind") == "rl":
        from allmap.app.rl_config import RL_DEFAULTS  # meta-RL loads torch-heavy parts only when asked for

        return _merge(RL_DEFAULTS, data)
    return _merge(DEFAULTS, data)


def load_config(preset_or_file: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a preset name or a YAML file, merge in its ``base``, apply ``key=value`` overrides, fill defaults and
    validate."""
    path = Path(preset_or_file)
    if not path.suffix and not path.exists():
        name = str(preset_or_file)
        path = preset_path(name)
    elif not path.is_file():
        known = list(list_presets())
        raise ConfigError(
            f"config file {str(path)!r} does not exist; {_did_you_mean(path.stem, known)}pass a preset "
            f"name ({', '.join(known)}) or the path of a YAML file."
        )
    else:
        name = str(path)
    config = with_defaults(_resolve(_read_yaml(path), (name,)))
    config = apply_overrides(config, overrides or [])
    _check_text(config)
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
                raise ConfigError(
                    f"--set {key}: {part!r} is not a section of the config; sections are "
                    f"{', '.join(k for k, v in config.items() if isinstance(v, dict))}."
                )
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
    if config.get("kind") == "rl":
        from allmap.app.rl_config import validate_rl

        validate_rl(config)
        return
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid top-level keys: {', '.join(DEFAULTS)}.")
    for key in _POSITIVE_INTS:
        if not _is_int(config[key]) or config[key] < 1:
            raise ConfigError(f"config key {key!r} must be a positive integer, got {config[key]!r}.")
    missing = sorted(set(DEFAULTS) - set(config) - {"on_nonfinite", "ema", "imports", "log"})
    if missing:
        raise ConfigError(f"config key(s) {missing} are missing; start from a preset (`allmap show NAME`).")
    ev = config["eval"]
    if not isinstance(ev, dict) or set(DEFAULTS["eval"]) - set(ev):
        raise ConfigError(
            f"config section 'eval' must be a mapping with keys {', '.join(DEFAULTS['eval'])}, got {ev!r}; "
            "set single keys with --set eval.KEY=VALUE."
        )
    for key, value in (("seed", config["seed"]), ("eval.seed", ev["seed"])):
        if not _is_int(value) or not 0 <= value < 2**63 - 1:  # torch generators take 64-bit seeds
            raise ConfigError(f"config key {key!r} must be an integer in [0, 2**63), got {value!r}.")
    for section, name_key in (("task", "family"), ("model", "name"), ("learner", "name"), ("optimizer", "name")):
        if not isinstance(config[section], dict) or not isinstance(config[section].get(name_key), str):
            raise ConfigError(
                f"config section {section!r} must be a mapping with a {name_key!r} string, got {config[section]!r}."
            )
    unknown = sorted(set(ev) - set(DEFAULTS["eval"]))
    if unknown:
        raise ConfigError(f"unknown eval key(s) {unknown}; valid: {', '.join(DEFAULTS['eval'])}.")
    overrides = ev["task"]
    if not isinstance(overrides, dict) or "family" in overrides:
        raise ConfigError(
            f"config key 'eval.task' must be a mapping of task keys that the validation and test episodes "
            f"use instead of the training ones (e.g. {{within_alphabet: true, rotations: [0]}}), without "
            f"'family', got {overrides!r}."
        )
    for key in _EVAL_POSITIVE_INTS:
        if not _is_int(ev[key]) or ev[key] < 1:
            raise ConfigError(f"config key 'eval.{key}' must be a positive integer, got {ev[key]!r}.")
    for key in ("shots", "queries", "ways"):
        if ev[key] is not None and (not _is_int(ev[key]) or ev[key] < 1):
            raise ConfigError(f"config key 'eval.{key}' must be a positive integer or null, got {ev[key]!r}.")
    steps = ev["steps"]
    if not isinstance(steps, list) or not steps or not all(_is_int(s) and 0 <= s <= MAX_STEPS for s in steps):
        raise ConfigError(
            f"config key 'eval.steps' must be a non-empty list of integers in [0, {MAX_STEPS}], got {steps!r}."
        )
    val_steps = ev["val_steps"]
    if val_steps is not None and not (_is_int(val_steps) and 0 <= val_steps <= MAX_STEPS):
        raise ConfigError(
            f"config key 'eval.val_steps' must be an integer in [0, {MAX_STEPS}] (inner steps before validation "
            f"scores a task) or null (the learner's inner_steps), got {val_steps!r}."
        )
    threads = config["threads"]
    if threads is not None and (not _is_int(threads) or not 1 <= threads <= 4096):
        raise ConfigError(
            f"config key 'threads' must be a positive integer or null (torch's default), got {threads!r}."
        )
    if not isinstance(config.get("retain_memory", True), bool):
        raise ConfigError(
            f"config key 'retain_memory' must be true (keep freed memory for reuse: faster, more RSS) "
            f"or false (return it to the system), got {config['retain_memory']!r}."
        )
    if config.get("on_nonfinite", "raise") not in ("raise", "skip"):
        raise ConfigError(
            f"config key 'on_nonfinite' must be 'raise' (stop with an error naming the iteration) or "
            f"'skip' (skip that meta-batch and count it in the metrics log), got {config['on_nonfinite']!r}."
        )
    imports = config.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(m, str) and _is_module_name(m) for m in imports):
        raise ConfigError(
            f"config key 'imports' must be a list of module names such as [my_learners] (modules "
            f"imported before the config's names are resolved, e.g. to run their "
            f"@allmap.register lines), got {imports!r}."
        )
    ema = config.get("ema")
    if ema is not None and not is_decay(ema):
        raise ConfigError(
            f"config key 'ema' must be null (evaluate the last weights) or a decay in (0, 1) such as "
            f"0.998 (evaluate an exponential moving average of the weights over about "
            f"1 / (1 - decay) steps), got {ema!r}."
        )
    log = config.get("log", {})
    if not isinstance(log, dict) or set(log) - {"tensorboard"} or not isinstance(log.get("tensorboard", False), bool):
        raise ConfigError(
            f"config key 'log' must be a mapping {{tensorboard: true/false}} (true: also write TensorBoard event "
            f"files to RUN_DIR/tensorboard), got {log!r}."
        )
    if not isinstance(config["device"], str):
        raise ConfigError(
            f"config key 'device' must be a string such as 'auto', 'cpu' or 'cuda', got {config['device']!r}."
        )


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` writing multi-line strings (``notes``) as literal blocks, line for line."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def dump_config(config: dict[str, Any]) -> str:
    """The config as YAML text (written to the run folder, printed by ``allmap show``)."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=200)

"""AutoML experiments as runs: a config (a preset of ``presets/automl/`` or a YAML file) in, a run folder out
(``config.yaml``, ``results.json`` with every metric as mean ± 95% CI over seeds, PNG plots).

Four experiments, named by the config's ``experiment`` key:

* ``hd``: SGD and Adam against HD-SGD and HD-Adam at the same initial rate (Baydin et al. 2018);
* ``bilevel``: hyperparameters learned by a hypergradient strategy, beside the untuned baseline and a search
  over one global hyperparameter (a grid, or random values);
* ``reweight``: plain training against learning to reweight examples under flipped labels (Ren et al. 2018);
* ``darts``: cells found by DARTS (first and second order) against random search at the same CPU time.

Times are process CPU seconds (``time.process_time``), which other processes on the machine do not inflate.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from allmap.app.automl_plots import PLOTS
from allmap.app.config import ConfigError, apply_overrides, read_yaml
from allmap.app.runs import to_json
from allmap.automl import BilevelProblem, Hyperparameters, evaluate, flip_labels, load_data, optimize, train_fixed
from allmap.automl.darts import CellNetwork, SearchNetwork, random_cell, search
from allmap.automl.hd import HDSGD, HDAdam
from allmap.automl.reweight import ValidationReweighting
from allmap.automl.training import fit
from allmap.engine.evaluate import summarize
from allmap.nets.mlp import MLP

__all__ = ["EXPERIMENTS", "run_experiment", "load_automl_config", "automl_presets", "summarize_seeds"]

PRESETS = Path(__file__).parent / "presets" / "automl"
Result = dict[str, Any]  # {"metrics": {name: float}, "curves": {...}} of one seed


def automl_presets() -> dict[str, str]:
    """AutoML preset name -> its one-line description."""
    return {p.stem: str(read_yaml(p).get("description", "")).strip() for p in sorted(PRESETS.glob("*.yaml"))}


def load_automl_config(name_or_file: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """An AutoML preset by name, or a YAML file, with ``key=value`` overrides applied."""
    path = Path(name_or_file)
    if not path.is_file():
        path = PRESETS / f"{name_or_file}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown AutoML preset {name_or_file!r}; known: {', '.join(automl_presets())}, or pass a YAML file."
            )
    config = apply_overrides(read_yaml(path), overrides or [])
    if config.get("experiment") not in EXPERIMENTS:
        raise ConfigError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {config.get('experiment')!r}.")
    return config


def _mlp(sizes: list[int]) -> torch.nn.Module:
    return MLP(sizes)


def _data(config: dict[str, Any], seed: int, flat: bool = True):
    data = dict(config.get("data", {"name": "digits"}))
    return load_data(data.pop("name"), seed=seed, flat=flat, **data)


# -- hd ----------------------------------------------------------------------------------------------------
def run_hd(config: dict[str, Any], seed: int) -> Result:
    """Each model of ``models`` trained by SGD, HD-SGD, Adam and HD-Adam from the same initialisation."""
    split = _data(config, seed)
    makers: dict[str, Callable] = {
        "sgd": lambda p: torch.optim.SGD(p, lr=config["sgd_lr"]),
        "hdsgd": lambda p: HDSGD(p, lr=config["sgd_lr"], hypergrad_lr=config["sgd_hypergrad_lr"]),
        "adam": lambda p: torch.optim.Adam(p, lr=config["adam_lr"]),
        "hdadam": lambda p: HDAdam(p, lr=config["adam_lr"], hypergrad_lr=config["adam_hypergrad_lr"]),
    }
    metrics, curves = {}, {}
    for model_name, sizes in config["models"].items():
        for opt_name, make in makers.items():
            torch.manual_seed(seed)
            model = _mlp([split.x_train.shape[1], *sizes, split.classes])
            curve = fit(model, split, make(model.parameters()), config["epochs"], config["batch_size"], seed)
            metrics[f"{model_name}/{opt_name}/val_loss"] = curve.val_loss[-1]
            metrics[f"{model_name}/{opt_name}/test_accuracy"] = curve.test_accuracy
            curves[f"{model_name}/{opt_name}"] = vars(curve)
    return {"metrics": metrics, "curves": curves}


# -- bilevel -----------------------------------------------------------------------------------------------
def _problem(config: dict[str, Any], split, hyper_spec: dict[str, Any], seed: int, strategy: str = "unrolled"):
    torch.manual_seed(seed)
    model = _mlp([split.x_train.shape[1], *config["hidden"], split.classes]).double()
    spec = dict(hyper_spec)
    if spec.pop("examples", False):
        spec["examples"] = len(split.y_train)
    hyper = Hyperparameters(model, **spec)
    return BilevelProblem(model, split, hyper, steps=config["inner_steps"], strategy=strategy, seed=seed), model


def _test(problem: BilevelProblem, model, params) -> dict[str, float]:
    return evaluate(model, params, problem.split.x_test, problem.split.y_test)


def run_bilevel(config: dict[str, Any], seed: int) -> Result:
    """Learned hyperparameters (``hyper`` by ``strategy``) against the untuned run and a search over one
    global hyperparameter (``search``), each trained for ``outer_steps * inner_steps`` full-batch steps."""
    split = _data(config, seed).to(dtype=torch.float64)
    total = config["outer_steps"] * config["inner_steps"]
    problem, model = _problem(config, split, config["hyper"], seed, config["strategy"])
    learned = optimize(problem, config["outer_steps"], config["hyper_lr"], warm_start=config.get("warm_start", True))
    fixed_spec = {k: v for k, v in config["hyper"].items() if not k.endswith("scope") and k != "examples"}
    base_problem, base_model = _problem(config, split, fixed_spec, seed)
    untuned = train_fixed(base_problem, base_problem.hyper.raw, total, config["inner_steps"])
    key, grid = config["search"]["key"], _search_values(config["search"], seed)
    runs, spent = [], 0.0
    for value in grid:
        p, m = _problem(config, split, {**fixed_spec, key: value}, seed)
        h = train_fixed(p, p.hyper.raw, total, config["inner_steps"])
        spent += h.cpu_seconds[-1]
        runs.append({"value": value, "val_loss": h.val_loss[-1], "cpu": spent, "test": _test(p, m, h.params)})
    best = min(runs, key=lambda r: r["val_loss"])
    metrics = {
        "learned/test_accuracy": _test(problem, model, learned.params)["accuracy"],
        "learned/val_loss": learned.val_loss[-1],
        "learned/cpu_seconds": learned.cpu_seconds[-1],
        "untuned/test_accuracy": _test(base_problem, base_model, untuned.params)["accuracy"],
        "untuned/val_loss": untuned.val_loss[-1],
        "search/test_accuracy": best["test"]["accuracy"],
        "search/val_loss": best["val_loss"],
        "search/cpu_seconds": spent,
        "search/best_value": best["value"],
        "search/oracle_test_accuracy": max(r["test"]["accuracy"] for r in runs),
    }
    curves = {"learned": vars(learned) | {"params": None, "raw": None}, "untuned": _curve(untuned), "search": runs}
    return {"metrics": metrics, "curves": curves}


def _curve(history) -> dict[str, Any]:
    return {"cpu_seconds": history.cpu_seconds, "val_loss": history.val_loss, "hyper": history.hyper}


def _search_values(spec: dict[str, Any], seed: int) -> list[float]:
    """``points`` values of ``key`` log-spaced over ``[low, high]`` (``kind: grid``) or log-uniform at random."""
    lo, hi, n = math.log(spec["low"]), math.log(spec["high"]), spec["points"]
    if spec.get("kind", "grid") == "grid":
        return [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [math.exp(lo + (hi - lo) * float(u)) for u in torch.rand(n, generator=g)]


# -- reweight ----------------------------------------------------------------------------------------------
def run_reweight(config: dict[str, Any], seed: int) -> Result:
    """Plain training and reweighted training on the same noisy labels, the same initialisation and batches."""
    clean = _data(config, seed)
    noisy, _ = flip_labels(clean, config["noise"], seed)
    metrics, curves = {}, {}
    for name in ("plain", "reweighted"):
        torch.manual_seed(seed)
        model = _mlp([clean.x_train.shape[1], *config["hidden"], clean.classes])
        opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
        weights = (
            ValidationReweighting(clean.x_val, clean.y_val, config["val_batch"], seed) if name != "plain" else None
        )
        curve = fit(model, noisy, opt, config["epochs"], config["batch_size"], seed, weights)
        metrics[f"{name}/test_accuracy"] = curve.test_accuracy
        metrics[f"{name}/cpu_seconds"] = curve.cpu_seconds[-1]
        curves[name] = vars(curve)
    metrics["gain/test_accuracy"] = metrics["reweighted/test_accuracy"] - metrics["plain/test_accuracy"]
    return {"metrics": metrics, "curves": curves}


# -- darts -------------------------------------------------------------------------------------------------
def _train_cell(genotype, split, config: dict[str, Any], seed: int) -> tuple[float, float, float]:
    """``(validation accuracy, test accuracy, CPU seconds)`` of a cell trained from scratch."""
    torch.manual_seed(seed)
    net = CellNetwork(genotype, split.x_train.shape[1], split.classes, config["channels"], config["cells"])
    opt = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=0.9, weight_decay=3e-4)
    curve = fit(net, split, opt, config["final_epochs"], config["batch_size"], seed)
    return curve.val_accuracy[-1], curve.test_accuracy, curve.cpu_seconds[-1]


def run_darts(config: dict[str, Any], seed: int) -> Result:
    """DARTS of each ``order``; random cells trained as the found ones until each search's CPU time is spent."""
    split = _data(config, seed, flat=False)
    metrics, curves, budgets = {}, {}, {}
    for order in config["orders"]:
        torch.manual_seed(seed)
        net = SearchNetwork(split.x_train.shape[1], split.classes, config["channels"], config["cells"], config["nodes"])
        found = search(net, split, config["search_epochs"], order, config["batch_size"], config["lr"], seed=seed)
        _, test, _ = _train_cell(found.genotype, split, config, seed)
        metrics[f"darts{order}/test_accuracy"] = test
        metrics[f"darts{order}/search_cpu_seconds"] = found.cpu_seconds
        budgets[order] = found.cpu_seconds
        curves[f"darts{order}"] = {"genotype": str(found.genotype), "alphas": found.alphas, "val_loss": found.val_loss}
    g = torch.Generator().manual_seed(10_000 + seed)
    pool, spent = [], 0.0
    while spent < max(budgets.values()):
        cell = random_cell(config["nodes"], g)
        val, test, cpu = _train_cell(cell, split, config, seed)
        spent += cpu
        pool.append({"genotype": str(cell), "val_accuracy": val, "test_accuracy": test, "cpu": spent})
    for order, budget in budgets.items():
        within = [c for c in pool if c["cpu"] <= budget] or pool[:1]
        tests = torch.tensor([c["test_accuracy"] for c in within])
        metrics[f"random{order}/median_test_accuracy"] = float(tests.median())
        metrics[f"random{order}/best_val_cell_test_accuracy"] = max(within, key=lambda c: c["val_accuracy"])[
            "test_accuracy"
        ]
        metrics[f"random{order}/cells"] = float(len(within))
    curves["random"] = pool
    return {"metrics": metrics, "curves": curves}


EXPERIMENTS: dict[str, Callable[[dict[str, Any], int], Result]] = {
    "hd": run_hd,
    "bilevel": run_bilevel,
    "reweight": run_reweight,
    "darts": run_darts,
}


def summarize_seeds(per_seed: list[Result]) -> dict[str, dict[str, float]]:
    """Every metric as mean ± 95% CI (``1.96 std / sqrt(n)`` over seeds, as the rest of allmap reports)."""
    names = per_seed[0]["metrics"]
    return {k: summarize(torch.tensor([r["metrics"][k] for r in per_seed], dtype=torch.float64)) for k in names}


def run_experiment(config: dict[str, Any], out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run ``config``'s experiment for seeds ``0..seeds-1`` into the run folder ``out``; returns the record
    written to ``results.json`` (``status``, ``protocol``, ``metrics`` as mean ± CI, ``per_seed``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(_dump(config))
    run = EXPERIMENTS[config["experiment"]]
    per_seed, start = [], time.process_time()
    for seed in range(config.get("seeds", 5)):
        result = run(config, seed)
        per_seed.append(result)
        if progress:
            print(f"seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()), flush=True)
    record = {
        "status": "ok",
        "experiment": config["experiment"],
        "protocol": f"{str(config.get('description', config['experiment'])).strip()} Mean ± 95% CI (1.96·std/sqrt(n)) over {len(per_seed)} seeds; "
        "times in process CPU seconds.",
        "metrics": summarize_seeds(per_seed),
        "per_seed": [r["metrics"] for r in per_seed],
        "cpu_seconds": time.process_time() - start,
    }
    (out / "results.json").write_text(to_json(record, indent=2) + "\n")
    (out / "curves.json").write_text(to_json([r["curves"] for r in per_seed]) + "\n")
    PLOTS[config["experiment"]](config, per_seed, out)
    return record


def _dump(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(copy.deepcopy(config), sort_keys=False, allow_unicode=True)

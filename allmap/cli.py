"""The ``allmap`` command: train | eval | report | runs | presets | show | plot | automl.

    allmap train PRESET_OR_CONFIG_FILE [--set key=value ...] [--out DIR]
    allmap train --resume RUN_DIR [--set iterations=N]
    torchrun --nproc_per_node=N -m allmap train ...      (data-parallel over N processes)
    allmap eval RUN_DIR [--tasks N] [--shots K] [--steps 0,1,5,10] [--set key=value ...] [--json]
    allmap eval PRESET_OR_CONFIG_FILE --weights CHECKPOINT [...]   (weights from elsewhere)
    allmap eval RUN_DIR RUN_DIR [...]                    (an ensemble: the mean of their class probabilities)
    (a meta-RL run, ``kind: rl``: returns after each step count with its baselines, see docs/meta-rl.md)
    allmap report RUN_DIR [RUN_DIR ...] --out report.html  (one self-contained HTML page)
    allmap runs DIR [--format text|csv|markdown]         (a table of the run folders under DIR)
    allmap presets                                       (each preset with its one-line description)
    allmap show PRESET_OR_CONFIG_FILE [--file]           (the resolved config, notes included)
    allmap plot RUN_DIR
    allmap automl [PRESET_OR_CONFIG_FILE] [--set key=value ...] [--out DIR]   (no preset: list them)
    allmap --version

Errors are one line on stderr (exit status 2); Ctrl-C exits with 130, a closed pipe (``allmap presets |
head``) quietly with 141, as the shell's 128 + signal number.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from allmap import __version__
from allmap.app.checkpoint import CheckpointError
from allmap.app.config import (
    ConfigError,
    apply_overrides,
    dump_config,
    list_presets,
    load_config,
    preset_path,
    validate,
)
from allmap.app.trainer import Interrupted, NonFiniteLossError
from allmap.engine.validate import TaskDataError

__all__ = ["main"]


def _add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option of the commands that read a config."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="allmap",
        description="Meta-learning on PyTorch: every meta-learner is a map "
        "from a task's support set to a model for that task.",
    )
    p.add_argument("--version", action="version", version=f"allmap {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a preset or a YAML config file")
    t.add_argument("config", nargs="?", help="preset name (see `allmap presets`) or path of a YAML config")
    _add_overrides(t, "override a config key, e.g. --set iterations=200 --set learner.inner_lr=0.1")
    t.add_argument("--out", help="run folder (default: runs/NAME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a trained run: mean ± 95%% CI over fixed test tasks")
    e.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR_OR_PRESET",
        help="a run folder, or a preset / config with --weights; several run folders are scored as an ensemble "
        "(the mean of their class probabilities) on the first one's protocol",
    )
    e.add_argument(
        "--weights",
        nargs="+",
        metavar="CHECKPOINT",
        help="evaluate these weights (a checkpoint.pt, or a learner state_dict saved with torch.save) with the "
        "preset or config file given instead of a run folder; several are scored as an ensemble",
    )
    e.add_argument("--tasks", type=int, help="number of test tasks (default: the run's eval.tasks, 600)")
    e.add_argument("--shots", type=int, help="support examples per test task (default: the run's)")
    e.add_argument("--steps", help="comma-separated inner step counts, e.g. 0,1,5,10")
    e.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="evaluate on another protocol, e.g. --set task.ways=20 --set eval.seed=7",
    )
    e.add_argument(
        "--phase",
        choices=("test", "val"),
        default="test",
        help="score the fixed test tasks (default), or the validation tasks, to choose among runs without "
        "looking at the test classes (needs a protocol that holds them out of training, e.g. lake-holdout)",
    )
    e.add_argument("--json", action="store_true", help="print JSON: each metric with mean and ci95")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("report", help="write one self-contained HTML page about one or several run folders")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (finished, failed or still training)")
    r.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    r.add_argument("--title", help="the page's title (default: the run names)")

    rs = sub.add_parser("runs", help="a table of the run folders under DIR: status, progress, final metrics")
    rs.add_argument("dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    rs.add_argument("--format", default="text", choices=("text", "csv", "markdown"), help="output format")
    rs.add_argument("--metrics", help="comma-separated metric columns, e.g. loss@0,loss@10 (default: all)")
    c = sub.add_parser(
        "continual",
        help="continual meta-test of a lifelong run (OML, ANML): one-pass class-incremental Omniglot streams, "
        "training-stream and held-out accuracy beside the baselines (a sine-incremental run: MSE over the "
        "functions seen after each one)",
    )
    c.add_argument("run_dir", help="the run to test (its results.json and continual.png receive the results)")
    c.add_argument(
        "--baseline",
        dest="baselines",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="another run on the same streams: a pretrained one (online and NCM heads), a ProtoNet (NCM head), "
        "another lifelong learner",
    )
    c.add_argument("--classes", default="10,50,100,200,600", help="comma-separated class counts N")
    c.add_argument("--runs", type=int, default=50, help="streams per N (default 50)")
    c.add_argument("--sweep-runs", type=int, default=5, help="streams of the learning-rate sweep per N (default 5)")
    c.add_argument("--seed", type=int, default=0, help="fixes the streams (default 0)")
    c.add_argument("--no-oracle", action="store_true", help="skip the offline head (the i.i.d. upper bound)")
    c.add_argument(
        "--scratch-runs",
        type=int,
        default=0,
        help="also train the whole network from scratch on this many streams per N (costly; default 0: off)",
    )
    c.add_argument(
        "--scratch-max-classes", type=int, default=200, help="the scratch baseline's largest N (default 200)"
    )
    c.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")

    sub.add_parser("presets", help="list the shipped presets")
    pl = sub.add_parser("plot", help="redraw a run's plots")
    pl.add_argument("run_dir")
    sp = sub.add_parser("show", help="print a preset's resolved config, its notes included (copy it to make your own)")
    sp.add_argument("preset", help="preset name (see `allmap presets`) or path of a YAML config")
    sp.add_argument(
        "--file",
        action="store_true",
        help="print the file as written (with its `base:`) instead of the resolved config",
    )
    a = sub.add_parser("automl", help="learn hyperparameters or a cell by hypergradients (AutoML presets)")
    a.add_argument("config", nargs="?", help="AutoML preset name or YAML file; omit it to list the presets")
    _add_overrides(a, "override a config key, e.g. --set seeds=2 --set outer_steps=10")
    a.add_argument("--out", help="run folder (default: runs/NAME)")
    a.add_argument("--quiet", action="store_true", help="no line per seed")
    return p


def _automl(args: argparse.Namespace) -> int:
    """Run an AutoML experiment into a run folder and print its metrics (mean ± 95% CI over seeds)."""
    from allmap.app.automl import automl_presets, load_automl_config, run_experiment
    from allmap.app.host import apply_threads
    from allmap.app.report import format_results

    if not args.config:
        _print_presets(automl_presets())
        return 0
    config = load_automl_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    _check_out_dir(out)
    apply_threads(config)
    record = run_experiment(config, out, progress=not args.quiet)
    print(format_results(record["metrics"], record["protocol"]))
    print(f"run folder: {out}")
    return 0


def _host_settings(config: dict | None, run_dir: str | None) -> None:
    """Threads and allocator of this process, from the config being trained or the run being resumed
    (an unreadable run folder is reported by ``resume`` itself)."""
    import yaml

    from allmap.app.host import apply_host_settings
    from allmap.app.runs import read_config

    if config is None:
        try:
            config = read_config(run_dir)
        except (ConfigError, OSError, ValueError, yaml.YAMLError):
            return
    apply_host_settings(config)


def _train(args: argparse.Namespace) -> int:
    from allmap.app import distributed
    from allmap.app.runs import RunDir
    from allmap.app.trainer import format_run_results, resume, train

    if args.resume and args.config:
        raise ConfigError("--resume takes the run folder; do not pass a config as well.")
    if not args.resume and not args.config:
        raise ConfigError(
            "allmap train needs a preset name or config file (see `allmap presets`), or --resume RUN_DIR."
        )
    config = None if args.resume else load_config(args.config, args.overrides)  # checked before joining the group
    if config is not None:
        _check_out_dir(Path(args.out or Path("runs") / Path(args.config).stem))
    _host_settings(config, args.resume)
    if _is_rl(config, args.resume):  # meta-RL runs (``kind: rl``) have their own trainer and results
        from allmap.app.rl_train import format_rl_results as format_run_results
        from allmap.app.rl_train import resume_rl as resume
        from allmap.app.rl_train import train_rl as train
    owns_group = distributed.init_from_env()  # under torchrun: join the process group (gloo / NCCL)
    try:
        if args.resume:
            resume(args.resume, args.overrides, progress=not args.no_progress)
            out = args.resume
        else:
            out = args.out or str(Path("runs") / Path(args.config).stem)
            train(config, out, progress=not args.no_progress)
        if distributed.current().is_main:
            res = json.loads(RunDir(out).results.read_text())
            print(format_run_results(res))
            print(f"run folder: {out}")
    finally:
        if owns_group:
            distributed.shutdown()
    return 0


def _is_rl(config: dict | None, run_dir: str | None) -> bool:
    """Whether the config (or the run folder's) is a meta-RL one (``kind: rl``)."""
    if config is not None:
        return config.get("kind") == "rl"
    import yaml

    from allmap.app.runs import RunDir

    path = RunDir(run_dir).config
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return False  # reported by the loader of the run
    return isinstance(data, dict) and data.get("kind") == "rl"


def _eval_rl(args: argparse.Namespace, run_dir: str, extra: list[str]) -> int:
    """``allmap eval`` of a meta-RL run: returns after each step count, with the baselines; rewrites the run's
    results.json and figures."""
    from allmap.app.host import apply_host_settings
    from allmap.app.rl_train import evaluate_rl, format_rl_results, load_rl
    from allmap.app.runs import read_config, to_json

    if args.shots is not None:
        raise ConfigError("--shots does not apply to a meta-RL run; set eval.trajectories=N instead.")
    config = apply_overrides(read_config(run_dir), extra)
    validate(config)
    apply_host_settings(config)
    learner, _ = load_rl(run_dir, config)
    record = evaluate_rl(learner, config, run_dir, write=True)
    print(to_json({"run": str(run_dir), **record}, indent=2) if args.json else format_rl_results(record))
    return 0


def _check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a run folder (a file, or a place where no folder can be
    made) before any work, with what to do instead."""
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {str(out)!r} is a file; expected a folder for the run (new, or without a "
            "run in it). Choose another --out."
        )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"--out {str(out)!r} cannot be created: {str(parent)!r} is a file, not a folder. Choose another --out."
        )
    try:  # the one sure test: make a folder there (root may write where os.access says no, and vice versa)
        os.rmdir(tempfile.mkdtemp(prefix=".allmap-", dir=parent))
    except OSError as err:
        raise ConfigError(
            f"--out {str(out)!r} cannot be created: no folder can be made in {str(parent)!r} "
            f"({err.strerror}). Choose a writable --out."
        ) from None


def _steps(text: str, option: str = "--steps", what: str = "inner step counts such as 0,1,5,10") -> list[int]:
    """``--steps 0,1,5`` as ``[0, 1, 5]``, or a ``ConfigError`` saying what the option takes."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ConfigError(f"{option} expects comma-separated {what}, got {text!r}.")
    return [int(part) for part in parts]


def _eval(args: argparse.Namespace) -> int:
    from allmap.app.evaluation import evaluate_run
    from allmap.app.host import apply_host_settings
    from allmap.app.report import format_results
    from allmap.app.runs import to_json
    from allmap.app.trainer import DivergedError

    extra = list(args.overrides)
    if args.tasks is not None:
        extra.append(f"eval.tasks={args.tasks}")
    if args.steps is not None:
        extra.append(f"eval.steps={_steps(args.steps)}")
    if args.shots is not None:
        extra.append(f"eval.shots={args.shots}")
    first = args.run_dirs[0]
    if _is_rl(None, first):
        if args.phase != "test" or len(args.run_dirs) > 1:
            raise ConfigError(
                "meta-RL runs are scored one at a time on fresh test goals: pass one run folder, without --phase."
            )
        return _eval_rl(args, first, extra)
    learner, config, trained = _eval_learner(args, extra)
    apply_host_settings(config)
    _, record = evaluate_run(learner, config, trained=trained, progress=not args.no_progress, phase=args.phase)
    results, text = record["metrics"], record["protocol"]
    if args.json:
        runs = args.run_dirs if args.weights is None else args.weights
        print(to_json({"run": ", ".join(map(str, runs)), **record}, indent=2))
    elif record["status"] == "ok":
        print(format_results(results, text))
    if record["status"] != "ok":
        inner = config["learner"].get("inner_lr")
        fix = (
            f"Evaluate with a lower learner.inner_lr (now {inner}) or fewer --steps, or retrain with a lower "
            "optimizer.lr"
            if inner is not None
            else "Retrain with a lower optimizer.lr"
        )
        raise DivergedError(f"the evaluation failed: {record['reason']}; these numbers are not a result. {fix}.")
    return 0


def _eval_learner(args: argparse.Namespace, extra: list[str]) -> tuple[Any, dict, list[dict]]:
    """``(learner, config, trained)`` of ``allmap eval``: the run's (or the preset's with ``--weights``)
    learner, an :class:`~allmap.learners.Ensemble` of several, the evaluation config (the first one's with
    the overrides) and the training configs, whose classes the test classes must not overlap."""
    from allmap.app.runs import load, load_weights, read_config
    from allmap.learners.ensemble import Ensemble

    if args.weights is None:
        trained = [read_config(run) for run in args.run_dirs]
        configs = [apply_overrides(t, extra) for t in trained]  # copies: ``trained`` stay the runs' own
        for c in configs:
            validate(c)
        members = [load(run, config=c) for run, c in zip(args.run_dirs, configs)]
    else:
        if len(args.run_dirs) > 1:
            raise ConfigError(
                f"--weights goes with one preset or config file, got {' '.join(args.run_dirs)!r}; to score run "
                "folders (several make an ensemble), drop --weights."
            )
        if (Path(args.run_dirs[0]) / "config.yaml").is_file():
            raise ConfigError(
                f"{args.run_dirs[0]!r} is a run folder, which has its own weights; pass a preset or config file "
                "with --weights, or drop --weights to evaluate the run's checkpoint."
            )
        trained = [load_config(args.run_dirs[0])]
        configs = [apply_overrides(trained[0], extra)]
        validate(configs[0])
        members = [load_weights(w, configs[0]) for w in args.weights]
    learner = members[0] if len(members) == 1 else Ensemble(members).eval()
    return learner, configs[0], trained


def _report(args: argparse.Namespace) -> int:
    from allmap.app.html_report import write_report

    out = write_report(args.runs, args.out, title=args.title)
    print(f"{out} ({out.stat().st_size / 1e6:.2f} MB, {len(args.runs)} run{'s' * (len(args.runs) != 1)})")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from allmap.app.runs_table import runs_table
    from allmap.app.summary import find_runs, summarize

    root = Path(args.dir)
    found = find_runs(root)
    if not found:
        raise ConfigError(f"no run folders (folders with a config.yaml) under {str(root)!r}.")
    names = [p.relative_to(root).as_posix() if p != root else p.name for p in found]
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    print(runs_table([summarize(p) for p in found], args.format, metrics, names), end="")
    return 0


def _continual(args: argparse.Namespace) -> int:
    import torch

    from allmap.app.continual import ContinualProtocol, continual_meta_test
    from allmap.app.continual_sine import SineProtocol, sine_meta_test
    from allmap.app.runs import read_config, to_json

    for run in (args.run_dir, *args.baselines):
        read_config(run)  # a clear error for a folder that is not a run
    config = read_config(args.run_dir)
    torch.set_num_threads(config.get("threads") or torch.get_num_threads())
    sine = config["task"]["family"] == "sine-incremental"  # incremental sine regression, else Omniglot classes
    try:
        if sine:
            task = config["task"]
            protocol = SineProtocol(
                slots=task.get("slots", 10),
                points=task.get("shots", 10),
                runs=args.runs,
                sweep_runs=args.sweep_runs,
                seed=args.seed,
            )
        else:
            protocol = ContinualProtocol(
                classes=tuple(_steps(args.classes, "--classes", "class counts such as 10,50,100")),
                runs=args.runs,
                sweep_runs=args.sweep_runs,
                seed=args.seed,
            )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    if sine:
        results, table = sine_meta_test(
            args.run_dir, args.baselines, protocol, not args.no_oracle, args.scratch_runs, progress=say
        )
    else:
        results, table = continual_meta_test(
            args.run_dir,
            args.baselines,
            protocol,
            oracle=not args.no_oracle,
            scratch_runs=args.scratch_runs,
            scratch_max_classes=args.scratch_max_classes,
            progress=say,
        )
    print(to_json(results, indent=2) if args.json else table)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from allmap.app.runs import RunDir, load, read_config
    from allmap.app.trainer import finish

    if _is_rl(None, args.run_dir):
        from allmap.app.rl_train import replot

        print("\n".join(str(p) for p in replot(args.run_dir)))
        return 0

    finish(args.run_dir, load(args.run_dir), read_config(args.run_dir), progress=True)
    run = RunDir(args.run_dir)
    print("\n".join(str(p) for p in (run.curve, run.adaptation) if p.exists()))
    return 0


def _show(args: argparse.Namespace) -> int:
    """Print the resolved config (base merged in, defaults filled), or with ``--file`` the file as written."""
    if args.file:
        path = Path(args.preset)
        print((path if path.is_file() else preset_path(args.preset)).read_text(), end="")
        return 0
    config = load_config(args.preset)
    print(
        f"# {args.preset}: the resolved config (base presets merged in, defaults filled); "
        f"the file as written: allmap show --file {args.preset}"
    )
    print(dump_config(config), end="")
    return 0


def _presets() -> int:
    """Print each shipped preset with its one-line description."""
    _print_presets(list_presets())
    return 0


def _print_presets(presets: dict[str, str]) -> None:
    """One line per preset: its name, padded, then its description."""
    width = max(map(len, presets), default=0) + 2
    for name, desc in presets.items():
        print(f"{name:<{width}}{desc}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "continual":
        return _continual(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "report":
        return _report(args)
    if args.command == "runs":
        return _runs(args)
    if args.command == "show":
        return _show(args)
    if args.command == "automl":
        return _automl(args)
    return _presets()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is handled below
        return status
    except (ConfigError, CheckpointError, NonFiniteLossError, TaskDataError) as err:
        print(f"allmap {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:  # SIGINT/SIGTERM: checkpoint saved, clean exit with the shell's 128 + signal
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the group
            print(f"allmap {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt as err:  # before or after training (during it, the first Ctrl-C is Interrupted)
        print(f"allmap {args.command}: {str(err) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)  # StoppedAtOnce names its signal
    except BrokenPipeError:  # the reader went away (`allmap presets | head`): stop quietly, as cat and ls do
        _silence_stdout()
        return 128 + getattr(signal, "SIGPIPE", 13)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (stdout replaced, as by pytest)
        pass


if __name__ == "__main__":
    sys.exit(main())

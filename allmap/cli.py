"""The ``allmap`` command: train | eval | presets | show | plot.

    allmap train PRESET_OR_CONFIG_FILE [--set key=value ...] [--out DIR]
    allmap train --resume RUN_DIR [--set iterations=N]
    torchrun --nproc_per_node=N -m allmap train ...      (data-parallel over N processes)
    allmap eval RUN_DIR [--tasks N] [--shots K] [--steps 0,1,5,10] [--set key=value ...] [--json]
    allmap presets                                       (each preset with its one-line description)
    allmap show PRESET_OR_CONFIG_FILE [--file]           (the resolved config, notes included)
    allmap plot RUN_DIR
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

__all__ = ["main"]


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
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set iterations=200 --set learner.inner_lr=0.1",
    )
    t.add_argument("--out", help="run folder (default: runs/NAME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a trained run: mean ± 95%% CI over fixed test tasks")
    e.add_argument("run_dir")
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
    e.add_argument("--json", action="store_true", help="print JSON: each metric with mean and ci95")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser(
        "continual",
        help="continual meta-test of a lifelong run (OML, ANML): one-pass class-incremental Omniglot streams, "
        "training-stream and held-out accuracy beside the baselines",
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
    return p


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
    from allmap.app.runs import load, read_config, to_json
    from allmap.app.trainer import DivergedError

    trained = read_config(args.run_dir)
    extra = list(args.overrides)
    if args.tasks is not None:
        extra.append(f"eval.tasks={args.tasks}")
    if args.shots is not None:
        extra.append(f"eval.shots={args.shots}")
    if args.steps is not None:
        extra.append(f"eval.steps={_steps(args.steps)}")
    config = apply_overrides(trained, extra)  # a copy: ``trained`` stays the run's own config
    validate(config)
    apply_host_settings(config)
    learner = load(args.run_dir, config=config)  # with the overrides (e.g. learner.test_shift), the run's weights
    _, record = evaluate_run(learner, config, trained=trained, progress=not args.no_progress)
    results, text = record["metrics"], record["protocol"]
    if args.json:
        print(to_json({"run": str(args.run_dir), **record}, indent=2))
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


def _continual(args: argparse.Namespace) -> int:
    import torch

    from allmap.app.continual import ContinualProtocol, continual_meta_test
    from allmap.app.runs import read_config, to_json

    for run in (args.run_dir, *args.baselines):
        read_config(run)  # a clear error for a folder that is not a run
    torch.set_num_threads(read_config(args.run_dir).get("threads") or torch.get_num_threads())
    try:
        protocol = ContinualProtocol(
            classes=tuple(_steps(args.classes, "--classes", "class counts such as 10,50,100")),
            runs=args.runs,
            sweep_runs=args.sweep_runs,
            seed=args.seed,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
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
    presets = list_presets()
    width = max(map(len, presets), default=0) + 2
    for name, desc in presets.items():
        print(f"{name:<{width}}{desc}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "continual":
        return _continual(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "show":
        return _show(args)
    return _presets()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is handled below
        return status
    except (ConfigError, CheckpointError, NonFiniteLossError) as err:
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

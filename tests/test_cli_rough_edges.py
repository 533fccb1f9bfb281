"""What a new user meets at the command line: one-line errors instead of tracebacks, quiet exits on a closed
pipe and Ctrl-C, --version, progress bars that change no number, readable results and plots."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.patches import Rectangle
from torch import nn

import allmap
from allmap.app import ConfigError, load_config, train
from allmap.app.build import build_family
from allmap.app.checkpoint import load_checkpoint
from allmap.app.config import read_yaml
from allmap.app.episode_plot import RIGHT, SUPPORT, WRONG, class_names, episodes_figure, plot_episode
from allmap.app.plots import learning_curve_figure
from allmap.app.progress import TaskProgress
from allmap.app.report import format_results
from allmap.cli import main
from allmap.engine.evaluate import evaluate, fixed_tasks
from allmap.nets import MLP
from allmap.tasks import ClassImages, Episodes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
TINY = ["iterations=20", "meta_batch=2", "eval.tasks=20", "eval.val_tasks=10", "eval.queries=10"]


def _sets(items: list[str]) -> list[str]:
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny sinusoid run with the default log_every (100), longer than the run."""
    out = tmp_path_factory.mktemp("runs") / "sine"
    train(load_config("sinusoid-maml", TINY), out, progress=False)
    return out


# -- 7: one-line errors, no tracebacks ----------------------------------------------------------------------


def test_out_that_is_a_file_or_cannot_be_created_is_one_line_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (afile, r"--out '.*afile' is a file; expected a folder for the run"),
        (afile / "sub", r"--out '.*sub' cannot be created: '.*afile' is a file, not a folder"),
    ]
    if Path("/proc/self").is_dir():  # a place where no folder can be made, even by root
        cases.append((Path("/proc/allmap-test/run"), r"cannot be created: no folder can be made in '/proc'"))
    for out, message in cases:
        assert main(["train", "sinusoid-maml", "--no-progress", "--out", str(out), *_sets(TINY)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("allmap train: error: "), err
        assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing made, not even a probe


def test_run_folder_with_invalid_yaml_is_named_by_eval_and_resume(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("seed: 0\niterations: [1, 2\n")
    for argv in (["eval", str(tmp_path)], ["train", "--resume", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"config file '{tmp_path / 'config.yaml'}' is not valid YAML: " in err
        assert "(line 3, column 1). Fix the file there" in err


def test_a_closed_pipe_exits_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as with `allmap presets | head -0`
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "allmap", "presets"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=tmp_path,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.returncode == 128 + signal.SIGPIPE
    assert proc.stderr == ""


def test_a_closed_pipe_in_process_returns_141_without_a_message(monkeypatch, capsys):
    class Closed:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["presets"]) == 141
    assert capsys.readouterr().err == ""


def test_ctrl_c_before_training_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("allmap.app.trainer._Trainer.__init__", interrupted)
    assert main(["train", "sinusoid-maml", "--no-progress", "--out", str(tmp_path / "r"), *_sets(TINY)]) == 130
    assert capsys.readouterr().err == "allmap train: interrupted (Ctrl-C)\n"


def test_ctrl_c_while_the_command_loads_is_one_line_and_130(tmp_path):
    """KeyboardInterrupt raised while ``python -m allmap`` imports the command's modules."""
    code = (
        "import runpy, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'allmap.app.trainer':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['allmap', 'presets']\n"
        "runpy.run_module('allmap', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "allmap: interrupted (Ctrl-C) while starting\n"


# -- 13: --version, did you mean, duplicate keys, --steps '', a second Ctrl-C -------------------------------


def test_task_data_a_learner_cannot_take_is_one_line_and_2(tmp_path, capsys):
    """ProtoNet on logistic2d tasks, whose random supports can lack a class: the validator's message, no
    traceback."""
    argv = ["train", "logistic2d-metasgd", "--set", "learner={name: protonet}", "--out", str(tmp_path / "r")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("allmap train: error: ProtoNet: every class 0..1 needs a support example")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"allmap {allmap.__version__}\n" == "allmap 0.1.0\n"


def test_a_mistyped_preset_gets_did_you_mean(capsys):
    for argv in (["train", "sinusoid-mam"], ["show", "sinusoid-mam"], ["train", "sinusoid-mam.yaml"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "did you mean 'sinusoid-maml'? " in err and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match=r"unknown preset 'zzz'; known presets: "):  # nothing close: no guess
        load_config("zzz")


def test_duplicate_keys_are_refused_with_the_key_and_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("iterations: 5\nseed: 1\niterations: 7\n")
    with pytest.raises(ConfigError, match=r"dup.yaml' sets key 'iterations' twice \(line 1 and line 3\)"):
        load_config(path)
    path.write_text("seed: 1\ntask: {family: sinusoid, family: linreg}\n")
    with pytest.raises(ConfigError, match=r"sets key 'family' twice \(line 2 and line 2\)"):
        load_config(path)
    path.write_text("eval:\n  tasks: 5\n  seed: 3\n  tasks: 6\n")
    assert main(["train", str(path)]) == 2
    assert "sets key 'tasks' twice (line 2 and line 4); keep one of them." in capsys.readouterr().err
    path.write_text("iterations: 5\neval: {tasks: 5}\ntask: {family: sinusoid}\n")  # same key in two mappings: fine
    assert load_config(path)["iterations"] == 5
    path.write_text("task: &t {family: sinusoid, shots: 5}\nmodel:\n  <<: *t\n  shots: 7\n")  # a merge overrides
    assert read_yaml(path)["model"] == {"family": "sinusoid", "shots": 7}


@pytest.mark.parametrize("steps", ["", "1,,2", "a", "-1"])
def test_eval_steps_that_are_not_step_counts_are_refused(run, steps, capsys):
    assert main(["eval", str(run), "--steps", steps, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--steps expects comma-separated inner step counts such as 0,1,5,10, got {steps!r}." in err


def test_a_second_ctrl_c_stops_at_once_and_says_what_was_saved(tmp_path):
    """SIGINT, then SIGINT again while the run is still validating before its save: it stops at once, exit
    130, naming the checkpoint that is left (which holds the iteration it names)."""
    out = tmp_path / "cut"
    sets = [
        "iterations=1000000",
        "meta_batch=2",
        "log_every=1",
        "checkpoint_every=1",
        "eval.every=1",
        "eval.val_tasks=400",
    ]  # every iteration validates: most of the time goes there
    cmd = [sys.executable, "-m", "allmap", "train", "sinusoid-maml", "--out", str(out), "--no-progress", *_sets(sets)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        notice = ""
        while "received" not in notice and proc.poll() is None:  # wait until the first one was seen
            notice += proc.stderr.readline()
        assert "SIGINT received: stopping after this iteration and saving a checkpoint; press Ctrl-C again" in notice
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    saved = load_checkpoint(out / "checkpoint.pt")["iteration"]
    assert err == (
        f"allmap train: SIGINT received again: stopped at once, without saving; {out / 'checkpoint.pt'} "
        f"holds iteration {saved}. Continue from there with `allmap train --resume {out}`.\n"
    )


# -- 11: progress while evaluating; results to 2 decimals ---------------------------------------------------


def _sine_learner_and_tasks(n: int = 25):
    config = load_config("sinusoid-maml", ["eval.queries=10"])
    family = build_family(config, "test")
    torch.manual_seed(0)
    learner = allmap.MAML(MLP([1, 16, 1]), inner_lr=0.01, inner_steps=1)
    return learner, fixed_tasks(family, n, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_reports_progress_and_the_numbers_do_not_change(workers):
    learner, tasks = _sine_learner_and_tasks()
    calls = []
    with_bar = evaluate(learner, tasks, steps=[0, 1], chunk=10, workers=workers, progress=lambda *a: calls.append(a))
    plain = evaluate(learner, tasks, steps=[0, 1], chunk=10, workers=0)
    if workers:  # forked: one call per finished share (shares of 12 and 13 tasks)
        assert calls == ([(12, 25), (25, 25)] if sys.platform.startswith("linux") else [(10, 25), (20, 25), (25, 25)])
    else:  # here: one call per chunk of 10
        assert calls == [(10, 25), (20, 25), (25, 25)]
    for key, r in plain.items():
        assert with_bar[key]["mean"] == pytest.approx(r["mean"], rel=1e-6, abs=1e-9), key
        assert with_bar[key]["ci95"] == pytest.approx(r["ci95"], rel=1e-5, abs=1e-9), key


def test_task_progress_counts_tasks_on_a_terminal_and_stays_off_without_one(monkeypatch):
    assert TaskProgress("test", enabled=True, total=25).bar.disable  # stderr is no terminal under pytest
    assert TaskProgress("test", enabled=False).bar.disable  # --no-progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with TaskProgress("test", enabled=True) as bar:
        assert not bar.bar.disable
        bar(10, 25)
        bar(25, 25)
        assert (bar.bar.n, bar.bar.total) == (25, 25)
    assert terminal.getvalue().startswith("\rtest: ")  # drawn on the terminal, removed when done (leave=False)
    with TaskProgress("test", enabled=False) as bar:  # --no-progress, even on a terminal
        assert bar.bar.disable


def test_results_show_accuracy_to_2_decimals_and_losses_to_4_significant_digits():
    results = {"loss": {"mean": 0.0312345, "ci95": 0.0039}, "accuracy": {"mean": 0.989712, "ci95": 0.00181}}
    assert format_results(results, "protocol").splitlines() == [
        "protocol",
        "  loss      0.03123 ± 0.003900",
        "  accuracy  98.97% ± 0.18%",
    ]
    assert format_results({"loss@1": {"mean": 1234.56, "ci95": 12.0}}, "p").splitlines()[1] == "  loss@1  1235 ± 12.00"


def test_eval_prints_the_table_on_stdout(run, capsys):
    assert main(["eval", str(run), "--steps", "0,1", "--tasks", "12", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["loss@0", "loss@1"]
    mean, ci = lines[1].split()[1], lines[1].split()[3]
    assert len(mean.replace(".", "").lstrip("0")) == 4 and len(ci.replace(".", "").lstrip("0")) == 4


# -- 12: plots ---------------------------------------------------------------------------------------------


def test_a_run_shorter_than_log_every_logs_points_and_the_curve_shows_them(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # log_every = 100
    fig = learning_curve_figure([{"iteration": 20, "seconds": 1.0, "loss": 3.9, "val_loss": 3.7}])
    train_line = next(line for line in fig.axes[0].lines if line.get_label() == "train (query loss)")
    assert list(train_line.get_xdata()) == [20] and train_line.get_marker() == "o"  # one row: a visible dot
    plt.close(fig)


def _episodes(names: bool) -> Episodes:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 10, 1, 8, 8, generator=g)
    labels = [f"Alphabet_{c // 3}/{c:04d}" for c in range(6)] if names else None
    return Episodes(ClassImages.from_grid(images, names=labels), ways=3, shots=4, queries=5, rotations=(0, 90))


def _protonet() -> allmap.ProtoNet:
    torch.manual_seed(0)
    return allmap.ProtoNet(nn.Sequential(nn.Flatten(), MLP([64, 8])))


def test_class_names_come_from_the_collection_with_rotation_else_indices():
    family = _episodes(names=True)
    tasks = family.sample(2, torch.Generator().manual_seed(1))
    classes = tasks.info["classes"][0].tolist()
    expected = [
        f"{k}: Alphabet {(c % 6) // 3}/{c % 6:04d}" + (" (90°)" if c >= 6 else "") for k, c in enumerate(classes)
    ]
    assert class_names(family, tasks, 0) == expected
    unnamed = _episodes(names=False)
    assert class_names(unnamed, tasks, 0) == [
        f"{k}: class {c % 6}" + (" (90°)" if c >= 6 else "") for k, c in enumerate(classes)
    ]


def test_an_episode_shows_every_support_image_and_queries_framed_by_correctness():
    family, learner = _episodes(names=True), _protonet()
    tasks = family.sample(2, torch.Generator().manual_seed(1))
    fig, ax = plt.subplots()
    plot_episode(learner, family, tasks, [0], ax, 0, queries_shown=3)
    frames = [p.get_edgecolor() for p in ax.patches if isinstance(p, Rectangle)]
    blue = sum(1 for c in frames if c == plt.matplotlib.colors.to_rgba(SUPPORT))
    assert blue == 3 * 4  # all K = 4 support images of each of the 3 classes
    with torch.no_grad():
        model = learner.adapt(tasks.support_x[0], tasks.support_y[0])
        pred = model(tasks.query_x[0]).argmax(-1)
    shown = torch.cat([torch.nonzero(tasks.query_y[0] == k).flatten()[:3] for k in range(3)])
    right = int((pred[shown] == tasks.query_y[0][shown]).sum())
    assert sum(1 for c in frames if c == plt.matplotlib.colors.to_rgba(RIGHT)) == right
    assert sum(1 for c in frames if c == plt.matplotlib.colors.to_rgba(WRONG)) == 9 - right
    assert [t.get_text() for t in ax.texts] == [str(int(p)) for p in pred[shown]]  # predicted class under each
    assert [t.get_text() for t in ax.get_yticklabels()] == class_names(family, tasks, 0)
    assert min(t.get_fontsize() for t in ax.texts + ax.get_yticklabels()) >= 7
    plt.close(fig)


def test_the_episode_figure_title_does_not_overprint_the_panels():
    family, learner = _episodes(names=True), _protonet()
    tasks = family.sample(4, torch.Generator().manual_seed(1))
    fig = episodes_figure(learner, family, tasks, [0], n=4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        box = ax.get_tightbbox(renderer)  # the panel with its title and labels
        assert box.y1 <= top.y0 + 1, "suptitle overlaps a panel"
        assert box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1, "a panel's labels leave the figure"
    plt.close(fig)

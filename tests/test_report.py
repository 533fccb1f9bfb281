"""allmap report (the HTML file), allmap runs (the table), TensorBoard event files, allmap eval --weights.

The page as a user sees it in a browser is tested in tests/test_report_browser.py."""

from __future__ import annotations

import csv
import io
import json
import re
from html.parser import HTMLParser

import pytest
import torch
from _report_runs import TINY, report_runs

from allmap.app import ConfigError
from allmap.app.html_report import build_report, resolve_source
from allmap.app.runs import TIME_KEYS
from allmap.app.runs_table import runs_table
from allmap.app.summary import find_runs, metric_tables, read_rows, summarize
from allmap.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return report_runs(tmp_path_factory)


class _Elements(HTMLParser):
    """Every element's attributes, and the text inside each element with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag not in ("img", "meta", "br", "circle", "line", "polyline", "rect", "path"):
            self._open.append(a.get("id"))
            if a.get("id"):
                self.text[a["id"]] = ""

    def handle_endtag(self, tag):
        if self._open and tag not in ("img", "meta", "br", "circle", "line", "polyline", "rect", "path"):
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.text[i] += data


def _parse(text: str) -> _Elements:
    p = _Elements()
    p.feed(text)
    return p


def test_summary_reads_every_kind_of_run_folder(runs):
    done, new, going, failed = (summarize(runs[k]) for k in ("maml", "np", "training", "failed"))
    assert (done.status, done.iterations_done, done.iterations_total, done.preset) == (
        "finished",
        12,
        12,
        "sinusoid-maml",
    )
    assert "iterations=12" in done.changes and "log.tensorboard=true" in done.changes
    assert [t.path for t in new.tables] == [("metrics",), ("baselines", "oracle", "metrics")]
    assert new.tables[1].protocol == "the exact GP posterior on the same 50 tasks"
    assert [f.path.name for f in new.figures] == ["predictive_bands.svg"]
    assert new.figures[0].caption == "Predictive mean and 95% band"
    # a run still training: the half-written last line is left out; no results yet
    assert (going.status, going.iterations_done, going.iterations_total, going.wall_seconds) == (
        "interrupted",
        200,
        1000,
        3.25,
    )
    assert len(read_rows(runs["training"] / "metrics.jsonl")) == 2
    assert (failed.status, failed.iterations_done, failed.tables) == ("failed", 10, [])
    assert failed.reason == "training diverged at iteration 10"
    assert find_runs(runs["maml"].parent) == sorted(runs.values())


def test_metric_tables_are_found_wherever_results_json_holds_them():
    rec = {"mean": 1.0, "ci95": 0.1}
    found = metric_tables(
        {"metrics": {"a": rec}, "extra": {"x": {"b": rec}, "note": "text"}, "curves": {"c": {"d": rec}}}
    )
    assert [(t.path, list(t.metrics)) for t in found] == [(("metrics",), ["a"]), (("extra", "x"), ["b"])]
    assert found[1].pointer("b", "mean") == "/extra/x/b/mean"


def test_runs_table_text_csv_markdown(runs, capsys):
    root = runs["maml"].parent
    assert main(["runs", str(root)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[:3] == ["run", "preset", "learner"]
    status = {line.split()[0]: line for line in text[1:]}
    assert "finished" in status["maml"] and "interrupted" in status["training"] and "failed" in status["failed"]
    assert "200/1000" in status["training"] and "12/12" in status["maml"]
    assert main(["runs", str(root), "--format", "csv", "--metrics", "loss@0,accuracy@10"]) == 0
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    for name in ("maml", "metasgd"):
        metrics = json.loads((runs[name] / "results.json").read_text())["metrics"]
        assert float(rows[name]["loss@0 mean"]) == metrics["loss@0"]["mean"]  # full precision
        assert float(rows[name]["loss@0 ci95"]) == metrics["loss@0"]["ci95"]
    assert rows["maml"]["accuracy@10 mean"] == "" and float(rows["metasgd"]["accuracy@10 mean"]) > 0
    assert rows["training"]["status"] == "interrupted" and rows["training"]["loss@0 mean"] == ""
    assert main(["runs", str(root), "--format", "markdown", "--metrics", "loss@0"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | preset |") and md[1].startswith("|---|") and len(md) == 2 + len(runs)
    with pytest.raises(ConfigError, match="no run has this metric; the runs have"):
        runs_table([summarize(runs["maml"])], metrics=["nope"])


def test_report_is_one_self_contained_file_with_every_number_traceable(runs, tmp_path, capsys):
    order = ["maml", "metasgd", "np", "training", "failed"]
    out = tmp_path / "report.html"
    assert main(["report", *(str(runs[k]) for k in order), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text()
    assert out.stat().st_size < 5e6
    page = _parse(text)
    # no network: every src/href is inline (data:) or a link inside the page
    for tag, attrs in page.elements:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:", "#")), (tag, attrs[key][:80])
        assert not (tag == "link" or (tag == "script" and "src" in attrs))
    nums = [a for t, a in page.elements if "num" in a.get("class", "").split()]
    # every number of every evaluation table is on the page, and says where it comes from
    for i, key in enumerate(order):
        for table in summarize(runs[key]).tables:
            for name, record in table.metrics.items():
                for field in record:
                    src = "results.json#" + table.pointer(name, field)
                    shown = [a for a in nums if a["data-run"] == str(i) and a["data-src"] == src]
                    assert shown, (key, src)
                    assert all(float(a["data-value"]) == record[field] for a in shown)
    for key, record in (
        ("np", ("stream", "forgetting")),
        ("np", ("stream", "classes")),
        ("failed", ("stopped_after_iteration",)),
    ):
        src = "results.json#/" + "/".join(record)
        assert any(a["data-run"] == str(order.index(key)) and a["data-src"] == src for a in nums), src
    for a in nums:  # and each one's exact value is the file's
        run = runs[order[int(a["data-run"])]]
        assert float(a["data-value"]) == resolve_source(run, a["data-src"]), a
    # every logged value is a point of a curve
    points = [a for t, a in page.elements if t == "circle" and a.get("data-src", "").startswith("metrics.jsonl")]
    rows = read_rows(runs["maml"] / "metrics.jsonl")
    for r, row in enumerate(rows):
        for k, v in row.items():
            if k not in ("iteration", *TIME_KEYS):
                assert any(p["data-src"] == f"metrics.jsonl#{r}/{k}" and float(p["data-y"]) == v for p in points)
    ids = set(page.text)
    for wanted in (
        "overview",
        "compare-table",
        "compare-curve-loss",
        "compare-adapt-loss",
        "run0-eval",
        "run0-curve-loss",
        "run0-adapt-loss",
        "run0-fig-adaptation",
        "run1-adapt-accuracy",
        "run2-table1",
        "run2-family-curve-accuracy-vs-classes",
        "run2-fig-predictive-bands",
        "run2-fields",
        "run3-status",
        "run4-reason",
    ):
        assert wanted in ids, wanted
    assert page.text["run3-status"] == "interrupted" and page.text["run4-status"] == "failed"
    assert "compare-protocols-differ" in ids  # a sinusoid and a logistic run are on different protocols


def test_report_of_one_run_has_no_comparison(runs):
    text = build_report([runs["maml"]])
    assert 'id="compare-table"' not in text and 'id="run0-eval"' in text


def test_report_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a run folder: it has no config.yaml" in capsys.readouterr().err


def test_tensorboard_event_files_hold_the_run(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["maml"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    rows = read_rows(runs["maml"] / "metrics.jsonl")
    assert scalars["train/loss"] == pytest.approx({r["iteration"]: r["loss"] for r in rows if "loss" in r}, rel=1e-6)
    assert scalars["val/loss"] == pytest.approx({r["iteration"]: r["val_loss"] for r in rows if "val_loss" in r})
    metrics = json.loads((runs["maml"] / "results.json").read_text())["metrics"]
    for name, r in metrics.items():
        assert scalars[f"test/{name}"] == pytest.approx({12: r["mean"]}, rel=1e-6)
        assert scalars[f"test_ci95/{name}"] == pytest.approx({12: r["ci95"]}, rel=1e-6)
    text = acc.Tensors("test/evaluation/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "sinusoid 10-shot" in text and "| loss@0 |" in text
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    info = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = HParamsPluginData.FromString(info).session_start_info.hparams
    assert (hp["learner.inner_lr"].number_value, hp["meta_batch"].number_value) == (0.01, 4)
    assert hp["learner.name"].string_value == "maml"


def test_tensorboard_needs_a_mapping(tmp_path):
    from allmap.app import load_config

    with pytest.raises(ConfigError, match="config key 'log' must be a mapping"):
        load_config("sinusoid-maml", ["log=yes"])


def test_eval_takes_a_preset_with_weights(runs, tmp_path, capsys):
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["eval", str(runs["maml"]), "--json", "--no-progress"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", "sinusoid-maml", "--weights", str(runs["maml"] / "checkpoint.pt"), *sets, "--json"]) == 0
    from_preset = json.loads(capsys.readouterr().out)
    assert from_preset["metrics"] == from_run["metrics"] and from_preset["protocol"] == from_run["protocol"]
    # a bare state_dict saved with torch.save
    state = torch.load(runs["maml"] / "checkpoint.pt", weights_only=True)["learner"]
    torch.save(state, tmp_path / "weights.pt")
    with pytest.warns(UserWarning, match="cannot be verified"):
        assert main(["eval", "sinusoid-maml", "--weights", str(tmp_path / "weights.pt"), *sets, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == from_run["metrics"]
    assert main(["eval", str(runs["maml"]), "--weights", str(tmp_path / "weights.pt")]) == 2
    assert "is a run folder, which has its own weights" in capsys.readouterr().err
    assert main(["eval", "sinusoid-maml", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert re.search(r"--weights .*missing.pt' is not a file", capsys.readouterr().err)


def test_tensorboard_of_a_resumed_run_continues_without_a_doubled_stretch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from allmap.app import load_config, resume, train
    from allmap.app.trainer import Interrupted

    config = load_config("sinusoid-maml", [*TINY, "log.tensorboard=true", "log_every=2"])
    out = tmp_path / "run"

    def stop(iteration, learner):
        if iteration == 7:  # after the checkpoint at 6 and a logged row at 6; the row of 8 never comes
            raise Interrupted(15, iteration, out / "checkpoint.pt")

    with pytest.raises(Interrupted):
        train(config, out, progress=False, callback=stop)
    resume(out, progress=False)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    rows = read_rows(out / "metrics.jsonl")
    assert steps == [r["iteration"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows if "loss" in r])

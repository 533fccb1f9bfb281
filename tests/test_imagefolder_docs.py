"""The worked example of docs/your-images.md runs as written: train and eval through the
CLI on a generated image folder, test classes held out of training."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from allmap.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-images.md"
# scale only: fewer and smaller steps; every other key is the documented config
TINY = [
    "iterations=2",
    "log_every=1",
    "checkpoint_every=2",
    "eval.every=2",
    "eval.tasks=6",
    "eval.val_tasks=2",
    "task.size=28",
    "model.hidden=8",
]


def _example() -> dict:
    section = DOC.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the guide docs/your-images.md should hold one YAML example"
    return yaml.safe_load(blocks[0])


def _images(root: Path, classes: int = 30, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True)
        mean = rng.integers(0, 256, (28, 28, 3))
        for i in range(per_class):
            img = np.clip(mean + rng.normal(0, 30, mean.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class_{c:02d}" / f"{i}.png")


def test_the_documented_config_trains_and_evaluates_on_held_out_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALLMAP_CACHE", str(tmp_path / "cache"))
    config = _example()
    assert config["task"]["family"] == "imagefolder" and config["task"]["root"] == "data/my_images"
    monkeypatch.chdir(tmp_path)  # the example's relative root, data/my_images
    _images(tmp_path / "data" / "my_images")
    (tmp_path / "my_images.yaml").write_text(yaml.safe_dump(config))
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["train", "my_images.yaml", "--out", "runs/mine", "--no-progress", *sets]) == 0
    assert "accuracy" in capsys.readouterr().out
    results = json.loads((tmp_path / "runs" / "mine" / "results.json").read_text())
    assert all(math.isfinite(v) for r in results["metrics"].values() for v in (r["mean"], r["ci95"]))
    assert "test classes of a flat folder: 6 of 30" in results["protocol"]
    classes = json.loads((tmp_path / "runs" / "mine" / "classes.json").read_text())
    assert [len(classes[p]) for p in ("train", "val", "test")] == [19, 5, 6]
    assert not set(classes["test"]) & set(classes["train"]) and not set(classes["val"]) & set(classes["train"])
    assert main(["eval", "runs/mine", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["accuracy"]["n"] == 6 and math.isfinite(report["metrics"]["accuracy"]["mean"])
    assert report["metrics"]["accuracy"]["mean"] == results["metrics"]["accuracy"]["mean"]

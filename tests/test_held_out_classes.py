"""Run start-up with class datasets: test and validation classes held out of training, and images that the
model cannot take, refused before training with the config key to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _util import image_folder, imagefolder_config

from allmap.app import ConfigError, load_config
from allmap.app.build import build_family, check_held_out
from allmap.app.trainer import check_config
from allmap.cli import main

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def test_train_refuses_to_test_on_its_training_classes(tmp_path, capsys):
    flat = image_folder(tmp_path / "flat", [f"c{i:02d}" for i in range(10)])
    out = tmp_path / "run"
    assert (
        main(["train", str(imagefolder_config(tmp_path, flat, split="train")), "--out", str(out), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "the test classes overlap the classes this run was trained on (6 of 6" in err
    assert "task.split = 'train' gives every phase (train, val, test) the same classes; remove task.split" in err
    assert not out.exists()  # refused before the run folder is made
    # without task.split the flat folder is split for it, and the run folder says which classes went where
    assert main(["train", str(imagefolder_config(tmp_path, flat)), "--out", str(out), "--no-progress"]) == 0
    classes = json.loads((out / "classes.json").read_text())
    assert [len(classes[p]) for p in ("train", "val", "test")] == [6, 2, 2]
    assert not set(classes["train"]) & (set(classes["val"]) | set(classes["test"]))
    assert (
        "test classes of a flat folder: 2 of 10, sorted class names shuffled with seed 0" in classes["sources"]["test"]
    )


@pytest.mark.parametrize(
    "held_out,message",
    [
        (
            "test",
            r"the test classes overlap .* \(1 of 2, e\.g\. 'cat'\).* Change task\.root: the class folders of test/",
        ),
        (
            "val",
            r"the validation classes overlap .* \(1 of 2, e\.g\. 'cat'\).* Change task\.root: the class folders of val/",
        ),
    ],
)
def test_split_folders_that_repeat_training_classes_are_refused(tmp_path, held_out, message):
    root = tmp_path / "data"
    image_folder(root / "train", ["cat", "dog", "eel"])
    for phase in ("val", "test"):
        image_folder(root / phase, ["cat", "fox"] if phase == held_out else [f"{phase}1", f"{phase}2"])
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(imagefolder_config(tmp_path, root)))


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
@pytest.mark.parametrize("split", ["train", "test", "vinyals-test", "vinyals-trainval"])
def test_omniglot_splits_that_test_on_training_characters_are_refused(split):
    config = load_config("omniglot-5w1s-protonet", ["meta_batch=1", "task.ways=5", f"task.split={split}"])
    with pytest.raises(ConfigError, match=rf"test classes overlap .* task\.split = '{split}' gives every phase"):
        check_config(config)


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
def test_omniglot_protocols_hold_their_test_characters_out():
    for protocol in ("standard", "standard-holdout", "lake", "shuffled-holdout"):
        config = load_config("omniglot-5w1s-protonet", [f"task.protocol={protocol}"])
        families = {p: build_family(config, p) for p in ("train", "val", "test")}
        check_held_out(config, families)  # standard and lake validate on training characters, by design
        assert families["val"].overlaps_training == (not protocol.endswith("holdout"))


@pytest.mark.parametrize(
    "sets,message",
    [
        (
            ["task.size=8"],
            r"images are 8x8, too small for model 'conv4': its downsampling needs at least 16x16\. "
            r"Raise task\.size to 16",
        ),
        (
            ["model.in_channels=1"],
            r"images have 3 channel\(s\) but model 'conv4' takes 1 \(model\.in_channels\); set "
            r"model\.in_channels: 3, or task\.channels: 1 to read the images as grey",
        ),
        (
            ["task.channels=1"],
            r"images have 1 channel\(s\) but model 'conv4' takes 3 .* set model\.in_channels: 1, or "
            r"task\.channels: 3 to read the images as RGB",
        ),
        (
            ["task.size=84", "learner.name=maml", "model.out_features=2"],
            r"model 'conv4': on 84x84 images its body gives 100 features but its head takes 4; set model\.flat_features: 100",
        ),
    ],
)
def test_images_the_model_cannot_take_are_refused_naming_the_key(tmp_path, sets, message):
    flat = image_folder(tmp_path / "flat", [f"c{i:02d}" for i in range(10)])
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(imagefolder_config(tmp_path, flat), sets))


def test_eval_phase_val_scores_the_held_out_validation_classes(tmp_path, capsys):
    flat = image_folder(tmp_path / "flat", [f"c{i:02d}" for i in range(10)])
    out = tmp_path / "run"
    assert main(["train", str(imagefolder_config(tmp_path, flat)), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--phase", "val", "--json", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert "4 fixed validation tasks" in record["protocol"] and 0.0 <= record["metrics"]["accuracy"]["mean"] <= 1.0
    assert main(["eval", str(out), "--json", "--no-progress"]) == 0
    assert "4 fixed test tasks" in json.loads(capsys.readouterr().out)["protocol"]


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
def test_eval_phase_val_is_refused_where_validation_characters_are_trained_on():
    from allmap.app.build import build_learner
    from allmap.app.evaluation import evaluate_run

    config = load_config("omniglot-5w1s-protonet-lake", ["model.hidden=4"])
    learner = build_learner(config, build_family(config, "test"))
    with pytest.raises(ConfigError, match="validation classes of task.protocol 'lake' are part of its training side"):
        evaluate_run(learner, config, phase="val")

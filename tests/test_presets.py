"""Presets: one-line descriptions, protocol notes, inheritance by ``base:``, and the presets/show commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from allmap.app import config as config_module
from allmap.app.config import MAX_DESCRIPTION, ConfigError, dump_config, list_presets, load_config, preset_path
from allmap.app.runs import read_config
from allmap.cli import main

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"

PRESETS = list(list_presets())
#: what product text must not carry: work items, measured figures, timings, machine-specific figures
NOT_IN_PRODUCT_TEXT = re.compile(
    r"session \d|issue \d|issue.s|seed 0\d|benchmarks/README|measured|\d ?%|\bminutes?\b|"
    r"\bhours?\b|\bcores?\b|\bs per\b|\d(\.\d+)?x (faster|slower)",
    re.IGNORECASE,
)


def _raw(name: str) -> dict:
    return yaml.safe_load(preset_path(name).read_text())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_has_a_short_description_and_protocol_notes(name):
    config = load_config(name)
    desc, notes = config["description"], config["notes"]
    assert desc == list_presets()[name]
    assert 40 <= len(desc) <= MAX_DESCRIPTION and "\n" not in desc
    assert len(notes.splitlines()) >= 2, "the full protocol is in notes"
    assert not NOT_IN_PRODUCT_TEXT.search(desc + "\n" + notes), NOT_IN_PRODUCT_TEXT.search(desc + "\n" + notes)
    assert yaml.safe_load(dump_config(config)) == config  # notes survive the run folder's config.yaml


def test_a_long_or_multi_line_description_is_refused(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: sinusoid-maml\ndescription: " + "x" * (MAX_DESCRIPTION + 1) + "\n")
    with pytest.raises(
        ConfigError,
        match=r"'description' must be one line of at most 160 characters .*got 161 "
        r"characters on 1 line\(s\); put the full protocol in 'notes'",
    ):
        load_config(path)
    path.write_text("base: sinusoid-maml\ndescription: |\n  first line\n  second line\n")
    with pytest.raises(ConfigError, match=r"got 22 characters on 2 line\(s\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'description' must be one line .*got 3"):
        load_config("sinusoid-maml", ["description=3"])
    with pytest.raises(ConfigError, match=r"'notes' must be a string .*got \[1, 2\]"):
        load_config("sinusoid-maml", ["notes=[1, 2]"])


def test_a_run_folder_with_an_old_long_description_still_loads(tmp_path):
    old = {k: v for k, v in load_config("sinusoid-maml").items() if k != "notes"}
    old["description"] = "MAML on sinusoid regression,\nmeasured over many lines. " * 30
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    config = read_config(tmp_path)
    assert config["notes"] == "" and config["learner"] == old["learner"]


def test_base_is_the_deep_merge_of_the_preset_with_own_keys(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: sinusoid-maml\ndescription: five steps\nlearner: {inner_steps: 5}\neval: {tasks: 7}\n")
    mine, base = load_config(path), load_config("sinusoid-maml")
    assert mine["learner"] == {**base["learner"], "inner_steps": 5}
    assert mine["eval"] == {**base["eval"], "tasks": 7}
    assert {k: v for k, v in mine.items() if k not in ("learner", "eval", "description", "notes")} == {
        k: v for k, v in base.items() if k not in ("learner", "eval", "description", "notes")
    }
    assert "base" not in mine and mine["description"] == "five steps"
    assert mine["notes"] == "", "notes describe the config that states them: not inherited"


def test_a_section_naming_another_component_replaces_the_base_section(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: sinusoid-maml\nlearner: {name: reptile, inner_lr: 0.02}\n")
    assert load_config(path)["learner"] == {"name": "reptile", "inner_lr": 0.02}  # no first_order from MAML


def test_bases_chain_and_overrides_apply_after_them(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: omniglot-5w1s-protonet-shuffled\noptimizer: {gamma: 0.7}\n")
    config = load_config(path, ["eval.tasks=9"])
    assert config["optimizer"] == {"name": "adam_step", "lr": 0.001, "every": 3750, "gamma": 0.7}
    assert config["task"]["protocol"] == "shuffled" and config["task"]["shift"] == 2 and config["ema"] == 0.998
    assert config["eval"]["tasks"] == 9


def test_unknown_bad_and_cyclic_bases_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text("base: sinusoid-mam\n")
    with pytest.raises(ConfigError, match=r"'base: sinusoid-mam' is not a preset; known presets: .*sinusoid-maml"):
        load_config(path)
    path.write_text("base: [sinusoid-maml]\n")
    with pytest.raises(ConfigError, match=r"'base' must name a preset \(.*\), got \['sinusoid-maml'\]"):
        load_config(path)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "a.yaml").write_text("base: b\n")
    (presets / "b.yaml").write_text("base: c\n")
    (presets / "c.yaml").write_text("base: a\n")
    (presets / "d.yaml").write_text("base: d\n")
    monkeypatch.setattr(config_module, "_presets_dir", lambda: presets)
    with pytest.raises(ConfigError, match=r"^c: 'base: a' makes a cycle \(a -> b -> c -> a\); .*Remove the 'base'"):
        load_config("a")
    with pytest.raises(ConfigError, match=r"makes a cycle \(d -> d\)"):
        load_config("d")


@pytest.mark.parametrize(
    "base,children",
    [
        (
            "omniglot-5w1s-protonet",
            ["omniglot-20w1s-protonet", "omniglot-5w1s-protonet-shuffled", "omniglot-5w1s-protonet-lake"],
        ),
        ("omniglot-5w1s-maml", ["omniglot-20w1s-maml", "omniglot-5w1s-maml-lake"]),
        ("omniglot-5w1s-matching", ["omniglot-5w1s-siamese"]),
        (
            "sinusoid-maml",
            [
                "sinusoid-maml-5shot",
                "sinusoid-fomaml",
                "sinusoid-anil",
                "sinusoid-metasgd",
                "sinusoid-reptile",
                "sinusoid-imaml",
                "sinusoid-lstm",
            ],
        ),
        ("linreg-hypernet", ["linreg-maml"]),
    ],
)
def test_presets_that_share_a_protocol_share_its_recipe(base, children):
    assert "base" not in _raw(base)
    recipe = load_config(base)
    for child in children:
        raw = _raw(child)
        assert raw["base"] == base, child
        # a child states only what differs from its base (a section naming another component is stated whole)
        repeated = [
            key
            for key, value in raw.items()
            if key not in ("base", "description", "notes")
            and (
                value == recipe[key]
                if not isinstance(value, dict)
                else "name" not in value and any(value[k] == recipe[key].get(k) for k in value)
            )
        ]
        assert not repeated, (child, repeated)


def test_the_lake_protonet_preset_has_the_protonet_recipe_on_the_lake_split():
    lake, standard = load_config("omniglot-5w1s-protonet-lake"), load_config("omniglot-5w1s-protonet")
    assert lake["task"] == {**standard["task"], "protocol": "lake", "rotations": [0]}
    skip = ("task", "description", "notes")
    assert {k: v for k, v in lake.items() if k not in skip} == {k: v for k, v in standard.items() if k not in skip}
    assert lake["task"]["shift"] == 2 and lake["ema"] == 0.998 and lake["learner"]["test_shift"] == 1
    assert lake["model"]["precision"] == "auto"  # bfloat16 where native


def test_the_lake_challenge_preset_tests_within_one_evaluation_alphabet_and_validates_on_held_out_ones():
    challenge, lake = load_config("omniglot-20w1s-lake-challenge"), load_config("omniglot-5w1s-protonet-lake")
    assert challenge["task"] == {**lake["task"], "protocol": "lake-holdout"}  # training episodes as the base's
    assert challenge["eval"]["task"] == {"within_alphabet": True, "rotations": [0]}
    assert {k: challenge["eval"][k] for k in ("ways", "shots", "queries")} == {"ways": 20, "shots": 1, "queries": 1}
    assert challenge["eval"]["tasks"] >= 2000 and challenge["model"]["precision"] == "float32"
    assert challenge["optimizer"]["every"] * 8 == challenge["iterations"]  # eight halvings, as the base


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
@pytest.mark.parametrize("phase", ["val", "test"])
def test_the_lake_challenge_preset_scores_within_alphabet_episodes_of_its_phase(phase):
    from allmap.app.build import build_family, build_learner
    from allmap.app.evaluation import evaluate_run

    config = load_config("omniglot-20w1s-lake-challenge", ["model.hidden=4", "eval.tasks=3", "learner.test_shift=0"])
    learner = build_learner(config, build_family(config, "test"))
    _, record = evaluate_run(learner, config, phase=phase)
    split = {"val": "background-val (114 characters)", "test": "evaluation (659 characters)"}[phase]
    words = {"val": "validation", "test": "test"}[phase]
    assert record["status"] == "ok" and "20-way 1-shot, 1 query per class" in record["protocol"]
    assert f"split {split}, no rotations, within-alphabet" in record["protocol"], record["protocol"]
    assert f"3 fixed {words} tasks" in record["protocol"]


def test_cli_presets_lists_descriptions_and_show_prints_the_resolved_config_with_notes(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == PRESETS
    notes = load_config("omniglot-5w1s-protonet-lake")["notes"]
    assert all(len(line) <= 33 + MAX_DESCRIPTION for line in lines)
    assert all(part not in "\n".join(lines) for part in notes.splitlines()[:2])
    assert main(["show", "omniglot-5w1s-protonet-lake"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# omniglot-5w1s-protonet-lake: the resolved config")
    assert "notes: |\n  Split: the original background / evaluation split of Lake et al. 2015" in out
    assert yaml.safe_load(out) == load_config("omniglot-5w1s-protonet-lake")
    assert main(["show", "--file", "omniglot-5w1s-protonet-lake"]) == 0
    assert capsys.readouterr().out == preset_path("omniglot-5w1s-protonet-lake").read_text()
    assert main(["show", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err

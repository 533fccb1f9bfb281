"""Hostile input, property-based (hypothesis): configs, ``--set`` overrides and task samplers.

Wrong types, zero/negative/huge values, more ways than classes, unknown keys: each must end in a clear
``ConfigError`` (configs) or ``ValueError``/``TypeError`` (the Python API) before any training starts,
never in a traceback from deep inside torch, and never by allocating the machine's memory away.
Examples per property are capped (``ALLMAP_HYPOTHESIS_EXAMPLES``, default 100) to keep CI fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allmap.app import ConfigError, load_config
from allmap.app.config import apply_overrides, validate
from allmap.app.trainer import check_config
from allmap.tasks import LinearRegression, Logistic2D, Sinusoid
from allmap.tasks.episodes import ClassImages, Episodes, gaussian_classes

EXAMPLES = int(os.environ.get("ALLMAP_HYPOTHESIS_EXAMPLES", "100"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="ALLMAP_HYPOTHESIS_RANDOM" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: a small, fast base for every mutated config (one trial meta-batch must be cheap)
BASE = ["iterations=3", "meta_batch=2", "eval.tasks=4", "eval.val_tasks=2", "eval.queries=5"]
PRESETS = ["sinusoid-maml", "linreg-hypernet", "logistic2d-metasgd", "sinusoid-reptile", "sinusoid-anil"]

HUGE = st.sampled_from([10**6, 10**9, 2**31, 2**63, 10**20, 10**100])
INTS = st.one_of(st.integers(-3, 3), st.integers(-(10**12), 10**12), HUGE, st.sampled_from([-(2**63), -(10**30)]))
SCALARS = st.one_of(
    INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["1e-3", "0x10", "nan", "-inf", "cpu", "cuda", "meta", "auto", "sgd", "mlp", "skip", ""]),
)
#: values that are often valid, so some mutated configs pass every check and the accepted path is exercised too
PLAUSIBLE = st.sampled_from([1, 2, 3, 5, 0.01, 0.1, True, False, "relu", "cpu", "skip", [1, 8, 1], [0, 1]])
VALUES = st.one_of(
    PLAUSIBLE,
    st.recursive(
        SCALARS,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=6,
    ),
)
KEYS = st.sampled_from(
    [
        "iterations",
        "meta_batch",
        "seed",
        "threads",
        "device",
        "log_every",
        "checkpoint_every",
        "on_nonfinite",
        "retain_memory",
        "description",
        "eval.tasks",
        "eval.seed",
        "eval.steps",
        "eval.shots",
        "eval.queries",
        "eval.every",
        "eval.val_tasks",
        "eval.chunk",
        "task",
        "task.family",
        "task.shots",
        "task.queries",
        "task.dim",
        "task.noise",
        "task.scale",
        "model",
        "model.name",
        "model.sizes",
        "model.activation",
        "model.norm",
        "learner",
        "learner.name",
        "learner.inner_lr",
        "learner.inner_steps",
        "learner.first_order",
        "learner.vectorize",
        "learner.loss",
        "learner.hidden",
        "optimizer.name",
        "optimizer.lr",
        "optimizer.betas",
        "optimizer.momentum",
        "bogus",
        "task.bogus",
        "eval.bogus",
        "learner.inner_rate",
    ]
)

tried = {"configs": 0, "overrides": 0, "families": 0, "episodes": 0}
outcomes = {"ok": 0, "refused": 0}


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    """Print how many hostile inputs were tried (``pytest -s`` shows it; the figures of the closing note)."""
    yield
    print(f"\nhostile inputs tried: {tried} total={sum(tried.values())}; configs accepted/refused: {outcomes}")


def _set(config: dict, dotted: str, value) -> dict:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return config


def _outcome(config: dict) -> str:
    """'ok' if every pre-training check passes, 'refused' on a ConfigError; anything else fails the test."""
    try:
        check_config(config)
    except ConfigError as err:
        assert str(err), "an error must say what is wrong"
        outcomes["refused"] += 1
        return "refused"
    outcomes["ok"] += 1
    return "ok"


@SETTINGS
@given(preset=st.sampled_from(PRESETS), edits=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_mutated_configs_are_refused_with_a_config_error_or_run(preset, edits):
    config = load_config(preset, BASE)
    for key, value in edits:
        config = _set(config, key, value)
    # round-trip through YAML, as a config file would arrive
    config = yaml.safe_load(yaml.safe_dump(config))
    tried["configs"] += 1
    _outcome(config)


@SETTINGS
@given(
    preset=st.sampled_from(PRESETS),
    overrides=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(lambda k, v: f"{k}={v}", KEYS, st.text(max_size=15)),
            st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}", KEYS, VALUES),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_hostile_set_overrides_are_refused_with_a_config_error_or_run(preset, overrides):
    tried["overrides"] += 1
    try:
        config = load_config(preset, BASE + overrides)
    except ConfigError:
        return
    _outcome(config)


@pytest.mark.parametrize(
    "edit,message",
    [
        (("meta_batch", 10**12), r"meta_batch = 1000000000000 tasks .* would take"),
        (("task.shots", 10**11), r"meta_batch = 2 tasks .* would take"),
        (("task.dim", 10**10), r"would take .* Lower"),
        (("model.sizes", [1, 10**6, 10**6, 1]), r"has 1,000,004,000,001 parameters"),
        (("learner.inner_steps", 10**15), r"inner_steps = 1000000000000000 is more than"),
        (("task.shots", 0), r"expected shots to be a positive integer, got 0"),
        (("task.queries", -5), r"expected queries to be a positive integer, got -5"),
        (("task.shots", 2.5), r"option 'shots' expects .*, got 2.5 \(float\)"),
        (("learner.inner_lr", "fast"), r"option 'inner_lr' expects a finite number, got 'fast'"),
        (("learner.inner_lr", float("nan")), r"option 'inner_lr' expects a finite number, got nan"),
        (("learner.inner_lr", -0.01), r"inner_lr must be a finite number >= 0 .*got -0.01\. A negative step climbs"),
        (("learner.first_order", "yes please"), r"option 'first_order' expects true/false"),
        (("task.bogus", 1), r"has no option\(s\) \['bogus'\]"),
        (("bogus", 1), r"unknown config key\(s\) \['bogus'\]"),
        (("seed", 2**70), r"'seed' must be an integer in \[0, 2\*\*63\)"),
        (("threads", 10**9), r"'threads' must be a positive integer"),
        (("device", "cuda:7" if not torch.cuda.is_available() else "meta"), r"config key 'device'"),
        (("on_nonfinite", "ignore"), r"'on_nonfinite' must be 'raise'"),
        (("retain_memory", "yes"), r"'retain_memory' must be true .* or false"),
    ],
)
def test_each_hostile_value_has_a_clear_message(edit, message):
    config = _set(load_config("linreg-hypernet" if edit[0] == "task.dim" else "sinusoid-maml", BASE), *edit)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_numbers_that_yaml_reads_as_strings_still_work():
    config = load_config("sinusoid-maml", BASE + ["optimizer.lr=1e-3", "learner.inner_lr=5E-2"])
    check_config(config)


# -- task samplers through the Python API --------------------------------------------------------------

ARG = st.one_of(
    st.integers(-3, 40),
    HUGE,
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.lists(st.one_of(st.integers(-2, 30), HUGE), max_size=3),
)


@SETTINGS
@given(
    family=st.sampled_from([Sinusoid, LinearRegression, Logistic2D]),
    shots=ARG,
    queries=ARG,
    n=st.one_of(st.integers(-3, 50), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=4)),
)
def test_regression_families_refuse_bad_arguments_or_sample_valid_tasks(family, shots, queries, n):
    """The Python API. (A huge ``n`` is not bounded here: ``family.sample(10**9, g)`` asks torch for the memory;
    the config path refuses such sizes in preflight, tested above.)"""
    tried["families"] += 1
    try:
        fam = family(shots=shots, queries=queries)
    except (ValueError, TypeError):
        return
    top = max(fam.shots) if isinstance(fam.shots, tuple) else fam.shots  # shots may be a range (lo, hi)
    if top * fam.queries > 10**4:  # legal but too big to sample in a unit test
        return
    try:
        tasks = fam.sample(n, torch.Generator().manual_seed(0))
    except (ValueError, TypeError):
        assert not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n)
        return
    lo, hi = fam.shots if isinstance(fam.shots, tuple) else (fam.shots, fam.shots)
    assert tasks.support_x.shape[0] == n and lo <= tasks.support_x.shape[1] <= hi
    assert tasks.query_x.shape[:2] == (n, queries)
    assert torch.isfinite(tasks.support_x).all() and torch.isfinite(tasks.query_x).all()


DATA = gaussian_classes(classes=12, per_class=6, shape=(1, 4, 4))


#: Episodes takes any Python int; counts above int64 overflow inside its torch comparisons (see the xfail
#: test below), so the property draws "huge" protocol values below 2**62.
EP_ARG = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([10**6, 10**9, 2**31, 2**62]),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)


@SETTINGS
@given(
    ways=EP_ARG,
    shots=EP_ARG,
    queries=EP_ARG,
    n=st.one_of(st.integers(-2, 6), EP_ARG),
    rotations=st.one_of(
        st.sampled_from([(0,), (0, 90), (0, 90, 180, 270), (0, 45), (), (90, 450), (0, 0)]),
        st.lists(st.integers(-720, 720), max_size=4),
    ),
    within=st.booleans(),
)
def test_episode_sampler_refuses_bad_protocols_or_samples_valid_episodes(ways, shots, queries, n, rotations, within):
    tried["episodes"] += 1
    try:
        fam = Episodes(DATA, ways=ways, shots=shots, queries=queries, rotations=rotations, within_group=within)
    except (ValueError, TypeError):
        return
    # accepted: the protocol fits the data
    assert fam.ways <= fam.classes and fam.shots + fam.queries <= 6
    try:
        tasks = fam.sample(n, torch.Generator().manual_seed(0))
    except (ValueError, TypeError):
        assert not (isinstance(n, int) and not isinstance(n, bool) and n >= 1)
        return
    assert tasks.support_x.shape == (n, ways * shots, 1, 4, 4) and tasks.query_y.shape == (n, ways * queries)
    for y, k in ((tasks.support_y, shots), (tasks.query_y, queries)):
        assert torch.equal(torch.bincount(y.flatten(), minlength=ways), torch.full((ways,), n * k))
    classes = tasks.info["classes"]
    assert all(len(set(row.tolist())) == ways for row in classes)  # distinct classes within an episode


@pytest.mark.xfail(
    strict=True,
    reason="allmap/tasks/episodes.py: queries >= 2**63 overflows int64 and is accepted "
    "(reported to its owner); the config path refuses it in preflight",
)
def test_episode_counts_beyond_int64_are_refused():
    with pytest.raises(ValueError):
        Episodes(DATA, ways=1, shots=1, queries=2**63)


def test_more_ways_than_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ways = 13 but the data have only 12 classes"):
        Episodes(DATA, ways=13, queries=2)
    with pytest.raises(ValueError, match=r"no group has 9 classes"):
        Episodes(DATA, ways=9, queries=2, within_group=True)
    with pytest.raises(ValueError, match=r"fewer than shots \+ queries = 7"):
        Episodes(DATA, ways=2, shots=2, queries=5)
    with pytest.raises(TypeError, match=r"expected data to be an allmap.tasks.ClassImages"):
        Episodes(torch.zeros(3, 4, 1, 2, 2))
    with pytest.raises(ValueError, match=r"counts .* must add up"):
        ClassImages(torch.zeros(5, 1, 2, 2), torch.tensor([2, 2]))


def test_validate_alone_rejects_non_mapping_sections():
    config = load_config("sinusoid-maml", BASE)
    for bad in ([1, 2], "mlp", None, 3):
        with pytest.raises(ConfigError):
            validate(apply_overrides(config, [f"model={yaml.safe_dump(bad, default_flow_style=True).strip()}"]))


def test_an_unrolled_graph_too_big_for_memory_is_refused():
    config = load_config("sinusoid-maml", BASE + ["model.sizes=[1, 3000, 3000, 1]", "learner.inner_steps=90000"])
    with pytest.raises(ConfigError, match=r"inner_steps = 90000 unrolled over meta_batch = 2 tasks"):
        check_config(config)


OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
@pytest.mark.parametrize(
    "sets,message",
    [
        (["task.ways=5000"], r"ways = 5000 but the data have only 4800 classes"),
        (["eval.ways=100000"], r"ways = 100000 but the data have only 688 classes"),
        (["task.shots=0"], r"expected shots to be a positive integer, got 0"),
        (["task.queries=10000000000"], r"fewer than shots \+ queries = 10000000001"),
        (["task.ways=2.5"], r"option 'ways' expects an integer, got 2.5"),
        (["task.rotations=[45]"], r"rotations in multiples of 90 degrees"),
    ],
)
def test_omniglot_protocols_that_cannot_be_sampled_are_refused(sets, message):
    config = load_config("omniglot-5w1s-protonet", ["meta_batch=2", "eval.tasks=4", "eval.val_tasks=2"] + sets)
    with pytest.raises(ConfigError, match=message):
        check_config(config)

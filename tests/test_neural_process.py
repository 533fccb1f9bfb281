"""GP regression tasks and their exact posterior, predictive metrics, and the neural processes (CNP, ANP).

The contract suite (tests/test_contract.py) covers CNP and ANP like every learner; here: the GP oracle
against a closed form, the task protocol, the Gaussian NLL and the mixture metrics against torch's
distributions, float64 gradcheck of the ANP's training-mode ELBO through its reparameterised sample, the
permutation invariance of both in the context set, and the CLI and torchrun on a GP preset.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _util import guide_module

import allmap
from allmap.app import load_config, train
from allmap.cli import main
from allmap.engine.evaluate import evaluate, evaluate_per_task, fixed_tasks
from allmap.engine.predictive import gaussian_nll, mixture_metrics, oracle_per_task
from allmap.nets import MLP
from allmap.tasks import GPRegression, gp_posterior

ROOT = Path(__file__).resolve().parents[1]
TINY = ["iterations=6", "meta_batch=8", "log_every=2", "checkpoint_every=3", "eval.tasks=25", "eval.every=3"]
TINY += ["eval.val_tasks=10", "model.sizes=[2, 16, 16]", "learner.decoder=[16]"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnp() -> allmap.CNP:
    torch.manual_seed(0)
    return allmap.CNP(MLP([2, 16, 16]), decoder=[16]).double()


def small_anp() -> allmap.ANP:
    torch.manual_seed(0)
    return allmap.ANP(MLP([2, 16, 16]), latent=[16], latent_dim=4, attention=[16], heads=2, decoder=[16]).double()


def gp_tasks(n: int = 3, seed: int = 0) -> allmap.TaskBatch:
    return GPRegression().sample(n, torch.Generator().manual_seed(seed)).to(dtype=torch.float64)


# -- the GP tasks and the oracle --------------------------------------------------------------------------
def test_gp_posterior_equals_the_closed_form_on_two_points():
    x1, x2, xs, y1, y2 = 0.3, -0.5, 0.1, 0.7, -0.2
    ls, sf, s = 0.4, 1.3, 0.1

    def k(a: float, b: float) -> float:
        return sf**2 * math.exp(-((a - b) ** 2) / (2 * ls**2))

    a, b, d = k(x1, x1) + s**2, k(x1, x2), k(x2, x2) + s**2  # [[a, b], [b, d]], inverted by hand
    det = a * d - b * b
    inv = [[d / det, -b / det], [-b / det, a / det]]
    kx = [k(xs, x1), k(xs, x2)]
    w = [kx[0] * inv[0][0] + kx[1] * inv[1][0], kx[0] * inv[0][1] + kx[1] * inv[1][1]]
    mean = w[0] * y1 + w[1] * y2
    var = sf**2 + s**2 - (w[0] * kx[0] + w[1] * kx[1])
    got_mean, got_std = gp_posterior(
        torch.tensor([[[x1], [x2]]]),
        torch.tensor([[[y1], [y2]]]),
        torch.tensor([[[xs]]]),
        torch.tensor([ls]),
        torch.tensor([sf]),
        s,
    )
    assert got_mean.dtype == torch.float64
    assert float(got_mean) == pytest.approx(mean, rel=1e-6, abs=1e-7)  # inputs pass through float32
    assert float(got_std) == pytest.approx(math.sqrt(var), rel=1e-6)


def test_gp_samples_have_the_kernel_as_covariance():
    family = GPRegression(length_scale=0.5, scale=0.8, noise=0.1)
    x = torch.tensor([[[0.0], [0.3]]]).expand(4000, 2, 1)
    y, _ = family.sample_functions(x, torch.Generator().manual_seed(0))
    cov = torch.cov(y[..., 0].T.double())
    k01 = 0.8**2 * math.exp(-(0.3**2) / (2 * 0.5**2))
    expected = torch.tensor([[0.64 + 0.01, k01], [k01, 0.64 + 0.01]], dtype=torch.float64)
    torch.testing.assert_close(cov, expected, atol=0.05, rtol=0)


def test_gp_tasks_follow_the_notebook_protocol():
    family = GPRegression()
    gen = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(40):
        t = family.sample(4, gen)
        nc, nq = t.shots, t.query_x.shape[1]
        sizes.add((nc, nq - nc))
        assert 3 <= nc <= 9 and 2 <= nq - nc <= 9
        assert torch.equal(t.query_x[:, :nc], t.support_x) and torch.equal(t.query_y[:, :nc], t.support_y)
        assert float(t.query_x.min()) >= -2 and float(t.query_x.max()) < 2
    assert len(sizes) > 10  # counts differ from meta-batch to meta-batch
    test = fixed_tasks(family, 600, seed=1000)
    assert sum(len(b) for b in test) == 600 and len({(b.shots, b.query_x.shape[1]) for b in test}) == len(test)
    again = fixed_tasks(family, 600, seed=1000)
    assert all(torch.equal(a.query_y, b.query_y) for a, b in zip(test, again))
    random_kernel = GPRegression(length_scale=[0.1, 0.6], scale=[0.1, 1.0]).sample(500, gen).info
    assert 0.1 <= float(random_kernel["length_scale"].min()) and float(random_kernel["length_scale"].max()) <= 0.6
    assert 0.1 <= float(random_kernel["scale"].min()) and float(random_kernel["scale"].max()) <= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"context": [5, 3]}, "context as an integer or a range"),
        ({"targets": -1}, "targets to be an integer >= 0"),
        ({"length_scale": 0.0}, "length_scale > 0"),
        ({"scale": [0.5, 0.1]}, "scale as a number or a range"),
        ({"noise": 0}, "noise .* > 0"),
        ({"x_range": [1.0, 1.0]}, "lo < hi"),
    ],
)
def test_gp_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPRegression(**kwargs)


# -- the loss and the metrics -----------------------------------------------------------------------------
def test_gaussian_nll_and_mixture_metrics_match_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean, std, y = torch.randn(3, 7, 1, generator=gen), torch.rand(3, 7, 1, generator=gen) + 0.2, torch.randn(7, 1)
    normal = torch.distributions.Normal(mean[0], std[0])
    assert float(gaussian_nll(torch.cat([mean[0], std[0]], -1), y)) == pytest.approx(-float(normal.log_prob(y).mean()))
    loglik, mse, coverage = mixture_metrics(mean[:1], std[:1], y)
    assert float(loglik) == pytest.approx(float(normal.log_prob(y).mean()), rel=1e-6)
    inside = ((y - mean[0]).abs() <= 1.959964 * std[0]).float().mean()
    assert float(coverage) == pytest.approx(float(inside)) and float(mse) == pytest.approx(
        float((mean[0] - y).pow(2).mean())
    )
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(7, 3)), torch.distributions.Normal(mean[..., 0].T, std[..., 0].T)
    )
    loglik, mse, _ = mixture_metrics(mean, std, y)
    assert float(loglik) == pytest.approx(float(mixture.log_prob(y[:, 0]).mean()), rel=1e-6)
    assert float(mse) == pytest.approx(float((mean.mean(0) - y).pow(2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="mean, then std"):
        gaussian_nll(torch.zeros(4, 3), torch.zeros(4, 1))


def test_evaluation_reports_predictive_metrics_over_every_batch_and_the_oracle():
    cnp, family = small_cnp(), GPRegression()
    tasks = [b.to(dtype=torch.float64) for b in fixed_tasks(family, 40, seed=3)]
    per_task = evaluate_per_task(cnp, tasks, steps=[0])
    assert set(per_task) == {"loss", "target_loglik", "context_loglik", "mse", "coverage95"}
    assert len(per_task["loss"]) == 40
    torch.testing.assert_close(per_task["target_loglik"], -per_task["loss"])  # one Gaussian: loglik = -NLL
    first = evaluate(cnp, tasks[0], steps=[0])
    assert first["mse"]["mean"] == pytest.approx(float(per_task["mse"][: len(tasks[0])].mean()))
    oracle = oracle_per_task(family, tasks)
    assert float(oracle["oracle_target_loglik"].mean()) > float(per_task["target_loglik"].mean())  # untrained


# -- the learners -----------------------------------------------------------------------------------------
def test_cnp_and_anp_are_invariant_to_the_order_of_the_context():
    tasks = gp_tasks()
    perm = torch.randperm(tasks.shots, generator=torch.Generator().manual_seed(1))
    for learner in (small_cnp(), small_anp()):
        learner.eval()
        for i in range(len(tasks)):
            sx, sy, qx = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i]
            a, b = learner.adapt(sx, sy), learner.adapt(sx[perm], sy[perm])
            torch.testing.assert_close(a(qx), b(qx), rtol=1e-12, atol=1e-12)
            if hasattr(a, "distribution"):
                torch.manual_seed(2)
                da = a.distribution(qx)
                torch.manual_seed(2)
                db = b.distribution(qx)
                torch.testing.assert_close(da, db, rtol=1e-12, atol=1e-12)
        permuted = allmap.TaskBatch(tasks.support_x[:, perm], tasks.support_y[:, perm], tasks.query_x, tasks.query_y)
        torch.testing.assert_close(learner.meta_loss(tasks), learner.meta_loss(permuted), rtol=1e-12, atol=1e-12)


def _cnp_classifier() -> tuple[allmap.CNPClassifier, allmap.TaskBatch]:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), MLP([16, 12, 6]))
    learner = allmap.CNPClassifier(encoder, features=6, decoder=[10, 7]).double().eval()
    family = allmap.tasks.Episodes(allmap.tasks.gaussian_classes(), ways=4, shots=2, queries=3)
    return learner, family.sample(3, torch.Generator().manual_seed(0)).to(dtype=torch.float64)


def test_cnp_classifier_is_the_decoder_on_the_concatenation_of_class_means_and_targets():
    """Against a plain loop: for every target and class, g([r_c, h(x)]) with g's first layer applied to the
    concatenation (its weight [W_r | W_x]), r_c the mean encoding of the class's support images."""
    learner, tasks = _cnp_classifier()
    first = torch.nn.Linear(12, 10).double()
    with torch.no_grad():
        first.weight.copy_(torch.cat([learner.class_in.weight, learner.target_in.weight], dim=1))
        first.bias.copy_(learner.class_in.bias)
    for i in range(len(tasks)):
        sx, sy, qx = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i]
        r = [learner.model(sx[sy == c]).mean(0) for c in range(4)]
        expected = torch.stack(
            [
                torch.stack([learner.decoder[1](torch.relu(first(torch.cat([rc, z])))).squeeze() for rc in r])
                for z in learner.model(qx)
            ]
        )
        torch.testing.assert_close(learner.adapt(sx, sy)(qx), expected, rtol=1e-12, atol=1e-12)


def test_cnp_classifier_is_invariant_to_the_order_of_the_context_and_equivariant_to_relabelling():
    learner, tasks = _cnp_classifier()
    order = torch.randperm(tasks.shots, generator=torch.Generator().manual_seed(1))
    relabel = torch.tensor([2, 0, 3, 1])  # class c becomes relabel[c]
    for i in range(len(tasks)):
        sx, sy, qx = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i]
        scores = learner.adapt(sx, sy)(qx)
        torch.testing.assert_close(learner.adapt(sx[order], sy[order])(qx), scores, rtol=1e-12, atol=1e-12)
        relabelled = learner.adapt(sx, relabel[sy])(qx)
        torch.testing.assert_close(relabelled[:, relabel], scores, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="set learner.features=6"):
        allmap.CNPClassifier(learner.model, features=5).double().meta_loss(tasks)
    with pytest.raises(ValueError, match="features"):
        allmap.CNPClassifier(learner.model, features=0)


def test_gradcheck_of_the_anp_elbo_through_its_sampled_latent():
    anp, tasks = small_anp(), gp_tasks(2)
    anp.train()
    noise = torch.randn(2, anp.latent_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in anp.named_parameters()]
    base = {n: p.detach() for n, p in anp.named_parameters()}

    def elbo(*params: torch.Tensor) -> torch.Tensor:
        with torch.nn.utils.stateless._reparametrize_module(anp, dict(zip(names, params))):
            return anp.objective(tasks, noise)

    params = tuple(base[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(elbo, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    # the training-mode loss is this ELBO with noise drawn from torch's generator
    torch.manual_seed(5)
    drawn = anp.meta_loss(tasks)
    torch.manual_seed(5)
    again = anp.objective(tasks, torch.randn(2, anp.latent_dim).double())
    assert drawn.detach().item() == pytest.approx(again.detach().item())


def test_anp_kl_is_the_kl_of_the_two_latent_gaussians():
    anp, tasks = small_anp(), gp_tasks(2)
    anp.eval()
    zero = torch.zeros(2, anp.latent_dim, dtype=torch.float64)
    prior = torch.distributions.Normal(*anp.latent_distribution(tasks.support_x, tasks.support_y))
    post_mean, post_std = anp.latent_distribution(tasks.query_x, tasks.query_y)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(post_mean, post_std), prior).sum(-1)
    nll = anp.loss_fn(
        anp.decode(anp.deterministic(tasks.support_x, tasks.support_y, tasks.query_x), post_mean, tasks.query_x),
        tasks.query_y,
    )
    expected = nll + kl.mean() / tasks.query_x.shape[1]
    assert float(anp.objective(tasks, zero).detach()) == pytest.approx(float(expected.detach()), rel=1e-12)


def test_neural_process_arguments_are_checked():
    with pytest.raises(ValueError, match=r"pair \[x, y\] of x_dim \+ y_dim = 2 features"):
        allmap.CNP(MLP([3, 8]))
    with pytest.raises(ValueError, match="decoder as a list of positive layer widths"):
        allmap.CNP(MLP([2, 8]), decoder=[0])
    with pytest.raises(ValueError, match=r"attention MLP's output width \(16\) must equal the encoder's \(8\)"):
        allmap.ANP(MLP([2, 8]), attention=[16])
    with pytest.raises(ValueError, match="min_std"):
        allmap.CNP(MLP([2, 8]), min_std=0.0)
    with pytest.raises(ValueError, match=r"divisible by heads"):
        allmap.ANP(MLP([2, 8]), attention=[8], heads=3)
    cnp = allmap.CNP(MLP([2, 8]))
    t = GPRegression().sample(2, torch.Generator().manual_seed(0))
    bad = allmap.TaskBatch(t.support_x, t.support_y[..., 0], t.query_x, t.query_y[..., 0])
    with pytest.raises(ValueError, match="gaussian_nll needs predictions"):
        cnp.meta_loss(bad)


# -- the application ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gp-cnp", "gp-anp"])
def test_train_and_eval_from_the_cli_report_the_oracle_and_plot(preset, tmp_path, capsys):
    out = tmp_path / "run"
    sizes = ["learner.latent=[16]", "learner.latent_dim=4", "learner.attention=[16]", "learner.heads=2"]
    args = ["train", preset, "--out", str(out), "--no-progress"]
    for s in TINY + (sizes if preset == "gp-anp" else []):
        args += ["--set", s]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok" and "3..9 context points" in results["protocol"]
    for key in ("target_loglik", "context_loglik", "mse", "coverage95", "oracle_target_loglik", "oracle_mse"):
        assert results["metrics"][key]["n"] == 25, key
    assert (out / "adaptation.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    if preset == "gp-cnp":  # deterministic: the same numbers as the run's own test
        for key, r in results["metrics"].items():
            assert again["metrics"][key]["mean"] == pytest.approx(r["mean"], rel=1e-6), key


def test_two_torchrun_ranks_score_the_gp_tasks_as_one_process(tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "allmap"]
    cmd += ["train", "gp-cnp", "--out", str(out), "--no-progress"]
    for s in TINY:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = train(load_config("gp-cnp", TINY), tmp_path / "one", progress=False)
    two = allmap.load(out)
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    res_one = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    res_two = json.loads((out / "results.json").read_text())["metrics"]
    assert set(res_one) == set(res_two)
    for key in res_one:
        assert res_two[key]["n"] == 25
        assert res_two[key]["mean"] == pytest.approx(res_one[key]["mean"], rel=1e-4, abs=1e-6), key


def test_the_guides_tiny_cnp_is_allmaps_cnp():
    """docs/extending.md's CNP in a few lines computes what allmap.CNP does, with the same weights."""
    cnp = small_cnp()
    tiny = guide_module("tiny_cnp.py").TinyCNP(MLP([2, 16, 16]), MLP([17, 16, 2])).double()
    tiny.load_state_dict(cnp.state_dict())
    tasks = gp_tasks()
    torch.testing.assert_close(tiny.meta_loss(tasks), cnp.meta_loss(tasks), rtol=1e-12, atol=0)
    got = evaluate(tiny, tasks, steps=[0])
    for key, r in evaluate(cnp, tasks, steps=[0]).items():
        assert got[key]["mean"] == pytest.approx(r["mean"], rel=1e-10), key

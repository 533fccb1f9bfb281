"""Meta-RL: the batched environment against a per-step loop, the policy-gradient estimator against the
analytic gradient of a bandit, DiCE's second derivative against the exact one on a tabular MDP, the
meta-gradient through the inner step against float64 finite differences and a per-task loop, TRPO's KL bound
and curvature product, the gymnasium adapter, exact resume, torchrun and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from allmap.app import load_config
from allmap.app.checkpoint import load_checkpoint
from allmap.app.config import ConfigError, list_presets
from allmap.app.rl_config import build_env, build_outer, build_rl_learner
from allmap.app.rl_train import resume_rl, train_rl
from allmap.app.summary import summarize
from allmap.cli import main
from allmap.rl import (
    MAMLRL,
    PPO,
    TRPO,
    BatchedEnv,
    GaussianPolicy,
    Navigation2D,
    Surrogate,
    Trajectories,
    dice_loss,
    make_policy,
    reinforce_loss,
    sample,
    sample_steps,
    stack,
    within_budget,
)
from allmap.rl.estimators import advantages, discounted, gae, linear_baseline
from allmap.rl.outer import kl_hvp

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "iterations=4",
    "meta_batch=5",
    "trajectories=3",
    "log_every=1",
    "checkpoint_every=2",
    "env.horizon=12",
    "eval.tasks=5",
    "eval.trajectories=3",
    "eval.steps=[0, 1]",
    "policy.hidden=[8]",
]


def _learner(dtype=torch.float32, hidden=(8,), **kwargs) -> tuple[Navigation2D, MAMLRL]:
    torch.manual_seed(0)
    env = Navigation2D(horizon=10)
    return env, MAMLRL(make_policy(env, hidden=hidden), **kwargs).to(dtype)


def test_batched_navigation_equals_a_per_step_loop():
    env, learner = _learner()
    tasks = env.sample_tasks(3, torch.Generator().manual_seed(1))
    tasks[0] = torch.tensor([0.05, -0.05], dtype=torch.float64)  # a goal the agent reaches: early ends
    traj = sample(env, learner.policy, learner.theta(3), tasks, 4, torch.Generator().manual_seed(2))
    for i in range(3):
        for b in range(4):
            x = y = 0.0
            alive = True
            for t in range(env.horizon):
                assert traj.mask[i, t, b] == float(alive)
                if not alive:
                    assert traj.rewards[i, t, b] == 0
                    continue
                assert traj.obs[i, t, b].tolist() == pytest.approx([x, y], abs=1e-6)
                ax, ay = (min(max(float(a), -0.1), 0.1) for a in traj.actions[i, t, b])
                x, y = x + ax, y + ay
                gx, gy = float(tasks[i, 0]), float(tasks[i, 1])
                assert float(traj.rewards[i, t, b]) == pytest.approx(-math.hypot(x - gx, y - gy), abs=1e-5)
                alive = not (abs(x - gx) < 0.01 and abs(y - gy) < 0.01)
    assert traj.mask[0].sum() < traj.mask[1].sum() or traj.mask[0].all()


def test_rescaled_navigation_moves_max_action_times_the_action():
    """cbfinn/maml_rl's normalised actions: the policy acts in [-1, 1] and moves max_action times that."""
    env = Navigation2D(rescale=True)
    tasks = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    state, _ = env.reset(tasks, 2)
    action = torch.tensor([[[0.5, -3.0], [-0.2, 1.0]]])
    state, obs, reward, _ = env.step(tasks, state, action)
    torch.testing.assert_close(state, torch.tensor([[[0.05, -0.1], [-0.02, 0.1]]], dtype=torch.float64))
    assert float(reward[0, 0]) == pytest.approx(-math.hypot(0.05 - 0.3, -0.1 + 0.2))
    plain, _, _, _ = Navigation2D().step(tasks, env.reset(tasks, 2)[0], action)
    torch.testing.assert_close(plain, torch.tensor([[[0.1, -0.1], [-0.1, 0.1]]], dtype=torch.float64))
    with pytest.raises(ValueError, match="expected rescale as true or false"):
        Navigation2D(rescale="yes")


def test_test_time_step_sizes_replace_inner_lr_step_by_step():
    """``lrs=[0.3, 0.05]``: the first step equals a learner built with inner_lr 0.3, the second moves by 0.05
    times the inner gradient at the first step's parameters (an autograd reference)."""
    env, learner = _learner(torch.float64, hidden=(4,))
    tasks = env.sample_tasks(2, torch.Generator().manual_seed(5))
    path, trajs = learner.adapt_and_sample(env, tasks, 3, 2, torch.Generator().manual_seed(6), lrs=[0.3, 0.05])
    torch.manual_seed(0)
    other = MAMLRL(make_policy(env, hidden=(4,)), inner_lr=0.3).double()
    other.load_state_dict(learner.state_dict())
    first, _ = other.adapt_and_sample(env, tasks, 3, 1, torch.Generator().manual_seed(6))
    for k in path[1]:
        torch.testing.assert_close(path[1][k], first[1][k], rtol=1e-12, atol=1e-12)
    p1 = {k: v.detach().requires_grad_(True) for k, v in path[1].items()}
    grads = torch.autograd.grad(learner.inner_loss(p1, trajs[1]).sum(), list(p1.values()))
    for (k, v), g in zip(p1.items(), grads):
        torch.testing.assert_close(path[2][k], v - 0.05 * g, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="eval.inner_lrs.*e.g. \\[0.5, 0.25\\]"):
        load_config("navigation2d-maml-trpo", ["eval.inner_lrs=0.5"])


class Bandit(BatchedEnv):
    """One step, observation 1, reward ``-(a - c)^2`` with the task's ``c``."""

    obs_dim, action_dim, horizon, task_dim = 1, 1, 1, 1

    def reset(self, tasks, batch, generator=None):
        state = tasks.new_ones(len(tasks), batch, 1)
        return state, state

    def step(self, tasks, state, action):
        reward = -((action[..., 0] - tasks[:, None, 0]) ** 2)
        return state, state, reward, torch.ones_like(reward, dtype=torch.bool)


def test_reinforce_gradient_matches_the_analytic_bandit_gradient():
    """J(mu, sigma) = E[-(a - c)^2] = -(mu - c)^2 - sigma^2 with a ~ N(mu, sigma^2): dJ/dmu = -2 (mu - c),
    dJ/dlog sigma = -2 sigma^2. REINFORCE (no baseline) in float64 over many samples, within 4 standard errors."""
    torch.manual_seed(0)
    policy = GaussianPolicy(1, 1, hidden=(), init_std=0.7).double()
    with torch.no_grad():
        policy.net.head.weight.fill_(0.3)
        policy.net.head.bias.fill_(0.1)
    tasks = torch.tensor([[-0.2]], dtype=torch.float64)
    learner = MAMLRL(policy, normalize=False)
    params = learner.theta(1)
    n = 200_000
    traj = sample(Bandit(), policy, params, tasks, n, torch.Generator().manual_seed(3))
    traj = traj.with_advantages(traj.rewards)
    loss = reinforce_loss(learner.log_prob(params, traj), traj).sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    mu, sigma, c = 0.4, 0.7, -0.2
    a, r = traj.actions[0, 0, :, 0], traj.rewards[0, 0]
    scores = [(a - mu) / sigma**2 * r, ((a - mu) ** 2 / sigma**2 - 1) * r]  # per-sample terms: standard errors
    expected = {"mu": -2 * (mu - c), "log_std": -2 * sigma**2}
    se_mu, se_s = (float(s.std() / math.sqrt(n)) for s in scores)
    assert -float(grads["net.head.bias"]) == pytest.approx(expected["mu"], abs=4 * se_mu)
    assert -float(grads["net.head.weight"]) == pytest.approx(expected["mu"], abs=4 * se_mu)
    assert -float(grads["log_std"]) == pytest.approx(expected["log_std"], abs=4 * se_s)


def _tabular(theta: torch.Tensor):
    """A 2-state, 2-action MDP (next state = action, reward R[s, a]) of horizon 3 from state 0, with a
    softmax policy of logits ``theta[s, a]``: every action sequence, its probability and per-step data."""
    rewards = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=torch.float64)
    out = []
    for seq in range(8):
        actions = [(seq >> k) & 1 for k in range(3)]
        states = [0, actions[0], actions[1]]
        logp = torch.stack([torch.log_softmax(theta[s], 0)[a] for s, a in zip(states, actions)])
        r = torch.stack([rewards[s, a] for s, a in zip(states, actions)])
        out.append((logp, r))
    return out


def test_dice_hessian_equals_the_exact_hessian_on_a_tabular_mdp():
    """E[Hess of -3 dice_loss] = Hess J exactly (expectation by enumerating the 8 trajectories); REINFORCE's
    surrogate misses the score-function term and differs."""
    theta0 = torch.tensor([[0.2, -0.4], [0.5, 0.1]], dtype=torch.float64)

    def exact(theta):
        return sum(lp.sum().exp() * r.sum() for lp, r in _tabular(theta))

    def estimate(theta, estimator):
        total = 0
        for lp, r in _tabular(theta):
            to_go = discounted(r.view(1, 3, 1), 1.0)
            traj = Trajectories(None, None, r.view(1, 3, 1), torch.ones(1, 3, 1, dtype=torch.float64), to_go)
            total = total + lp.sum().exp().detach() * -3 * estimator(lp.view(1, 3, 1), traj).sum()
        return total

    h_exact = torch.autograd.functional.hessian(exact, theta0)
    h_dice = torch.autograd.functional.hessian(lambda t: estimate(t, dice_loss), theta0)
    h_reinforce = torch.autograd.functional.hessian(lambda t: estimate(t, reinforce_loss), theta0)
    torch.testing.assert_close(h_dice, h_exact, rtol=1e-10, atol=1e-12)
    assert (h_reinforce - h_exact).abs().max() > 0.1
    g_exact = torch.autograd.functional.jacobian(exact, theta0)
    g_dice = torch.autograd.functional.jacobian(lambda t: estimate(t, dice_loss), theta0)
    torch.testing.assert_close(g_dice, g_exact, rtol=1e-10, atol=1e-12)


def _meta_batch(learner: MAMLRL, env: Navigation2D, n: int = 3, batch: int = 4):
    tasks = env.sample_tasks(n, torch.Generator().manual_seed(5))
    _, trajs = learner.adapt_and_sample(env, tasks, batch, generator=torch.Generator().manual_seed(6))
    return tasks, trajs


@pytest.mark.parametrize(
    "estimator, average", [("reinforce", "trajectory"), ("dice", "trajectory"), ("reinforce", "step")]
)
def test_meta_gradient_through_the_inner_step_passes_gradcheck_and_equals_a_per_task_loop(estimator, average):
    """REINFORCE: float64 gradcheck of the outer loss as a function of theta. Both estimators and both averages:
    the stacked meta-gradient equals adapting each task on its own with ``torch.autograd.grad(create_graph=True)``.
    A wide goal tolerance ends some trajectories early, where the two averages differ."""
    env, learner = _learner(torch.float64, hidden=(4,), estimator=estimator, average=average)
    env.tolerance = 0.3
    tasks, (pre, post) = _meta_batch(learner, env)
    assert (pre.mask.sum(1) < env.horizon).any() and (post.mask.sum(1) < env.horizon).any()
    surrogate = Surrogate(learner, [pre], post, total=3)
    names = [n for n, _ in learner.policy.named_parameters()]
    theta = tuple(p.detach().clone().requires_grad_(True) for p in learner.policy.parameters())

    def loss(*th):
        return surrogate.loss_kl(surrogate.outputs(dict(zip(names, th))))[0]

    if estimator == "reinforce":  # DiCE's meta-gradient is by design not the derivative of the sampled value
        assert torch.autograd.gradcheck(loss, theta, eps=1e-6, atol=1e-6)
    stacked = torch.autograd.grad(loss(*theta), theta)
    # the reference: each task adapted on its own with torch.autograd.grad(create_graph=True)
    total = 0
    for i in range(3):
        p = dict(zip(names, theta))
        one = lambda t, i=i: t.rows(slice(i, i + 1))  # noqa: E731
        inner = learner.inner_loss(stack(p, 1), one(pre)).sum()
        g = torch.autograd.grad(inner, list(p.values()), create_graph=True)
        adapted = {k: v - 0.1 * gk for (k, v), gk in zip(p.items(), g)}
        dist = learner.policy.dist(stack(adapted, 1), one(post).obs)
        old = tuple(d[i : i + 1] for d in surrogate.old_dist)
        ratio = torch.exp(
            learner.policy.log_prob(dist, one(post).actions) - learner.policy.log_prob(old, one(post).actions)
        )
        m, gain = one(post).mask, ratio * one(post).advantages
        per_task = (gain * m).sum() / m.sum() if average == "step" else ((gain * m).sum(1) / m.sum(1)).mean()
        total = total - per_task / 3
    reference = torch.autograd.grad(total, theta)
    for a, b in zip(stacked, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_step_average_is_rllabs_mean_over_concatenated_paths():
    """``average="step"``: every valid step of a task weighs the same (rllab's mean over the concatenated paths,
    cbfinn/maml_rl); ``"trajectory"``: each path's mean, then the paths (pytorch-maml-rl). Written out per path;
    they differ once paths end early. DiCE has the same value and gradient as REINFORCE under either."""
    torch.manual_seed(0)
    lengths = torch.tensor([[6, 2, 4], [1, 6, 3]])
    mask = (torch.arange(6)[None, :, None] < lengths[:, None, :]).double()
    traj = Trajectories(torch.randn(2, 6, 3, 2), torch.randn(2, 6, 3, 2), torch.randn(2, 6, 3), mask)
    traj = traj.with_advantages(torch.randn(2, 6, 3, dtype=torch.float64) * mask)
    log_prob = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    step, per_path = reinforce_loss(log_prob, traj, "step"), reinforce_loss(log_prob, traj, "trajectory")
    for i in range(2):
        paths = [log_prob[i, :n, j] * traj.advantages[i, :n, j] for j, n in enumerate(lengths[i].tolist())]
        torch.testing.assert_close(step[i], -torch.cat(paths).mean())
        torch.testing.assert_close(per_path[i], -torch.stack([p.mean() for p in paths]).mean())
    assert (step - per_path).abs().min() > 1e-3
    dice = dice_loss(log_prob, traj, "step")
    torch.testing.assert_close(dice, torch.zeros(2, dtype=torch.float64))
    g_dice, g_step = (torch.autograd.grad(x.sum(), log_prob)[0] for x in (dice, step))
    torch.testing.assert_close(g_dice, g_step)
    with pytest.raises(ValueError, match="unknown average 'path'; expected one of trajectory, step"):
        MAMLRL(make_policy(Navigation2D()), average="path")


def test_kl_curvature_product_equals_the_double_backward_hessian():
    env, learner = _learner(torch.float64, hidden=(4,))
    _, (pre, post) = _meta_batch(learner, env)
    surrogate = Surrogate(learner, [pre], post, total=3)
    params = dict(learner.policy.named_parameters())
    hvp = kl_hvp(surrogate, params, surrogate.outputs())
    v = [torch.randn_like(p) for p in params.values()]
    kl = surrogate()[1]
    g = torch.autograd.grad(kl, list(params.values()), create_graph=True)
    exact = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), list(params.values()))
    for a, b in zip(hvp(v), exact):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("fisher_every", [1, 2])
def test_trpo_step_improves_the_surrogate_within_its_kl_bound(fisher_every):
    env, learner = _learner(hidden=(8,))
    _, (pre, post) = _meta_batch(learner, env, n=4, batch=6)
    surrogate = Surrogate(learner, [pre], post, total=4)
    cfg = TRPO(max_kl=0.005, fisher_every=fisher_every)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    info = cfg.step(dict(learner.policy.named_parameters()), surrogate)
    with torch.no_grad():
        loss, kl = surrogate()
    assert info["line_search"] < cfg.ls_steps, info
    assert 0 < float(kl) < cfg.max_kl and float(kl) == pytest.approx(info["kl"], rel=1e-5)
    assert float(loss) < info["loss"]
    assert any((a != b).any() for a, b in zip(before, learner.policy.parameters()))


def test_baseline_gae_and_normalisation():
    torch.manual_seed(0)
    traj = Trajectories(torch.randn(2, 5, 3, 2), torch.randn(2, 5, 3, 2), torch.randn(2, 5, 3), torch.ones(2, 5, 3))
    values = linear_baseline(traj, 0.9)
    # lambda = 1: GAE is the discounted return minus the value; lambda = 0: the one-step TD error
    returns = discounted(traj.rewards, 0.9)
    torch.testing.assert_close(gae(traj.rewards, values, traj.mask, 0.9, 1.0), returns - values, atol=1e-5, rtol=1e-5)
    v_next = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    torch.testing.assert_close(gae(traj.rewards, values, traj.mask, 0.9, 0.0), traj.rewards + 0.9 * v_next - values)
    # the baseline is the least-squares fit (reg -> 0) of the returns on the features
    adv = advantages(traj, 0.9).advantages
    assert adv[0].mean().abs() < 1e-5 and adv[0].std() == pytest.approx(1.0, abs=1e-4)


def test_a_share_of_the_meta_batch_samples_the_rows_of_the_whole():
    env, learner = _learner()
    tasks = env.sample_tasks(5, torch.Generator().manual_seed(0))
    whole = sample(env, learner.policy, learner.theta(5), tasks, 3, torch.Generator().manual_seed(1))
    part = sample(env, learner.policy, learner.theta(2), tasks[3:], 3, torch.Generator().manual_seed(1), slice(3, 5), 5)
    torch.testing.assert_close(part.actions, whole.actions[3:])
    torch.testing.assert_close(part.rewards, whole.rewards[3:])


def test_step_budget_keeps_whole_paths_until_the_budget_as_rllabs_sampler():
    """``within_budget`` written out as rllab's loop: take paths in order while fewer than ``budget`` steps are
    collected. Masked-out paths count in no average: the mean return, and the trajectory average of a loss,
    equal those of the kept paths alone."""
    torch.manual_seed(0)
    lengths = torch.tensor([[6, 2, 4, 5], [1, 1, 6, 3]])
    mask = (torch.arange(6)[None, :, None] < lengths[:, None, :]).double()
    traj = Trajectories(torch.randn(2, 6, 4, 2), torch.randn(2, 6, 4, 2), torch.randn(2, 6, 4).double() * mask, mask)
    cut = within_budget(traj, 8)
    for i in range(2):
        kept, steps = [], 0
        for j, n in enumerate(lengths[i].tolist()):
            if steps >= 8:
                break
            kept.append(j)
            steps += n
        assert (cut.mask[i].sum(0) > 0).nonzero().flatten().tolist() == kept
        torch.testing.assert_close(cut.mean_return()[i], traj.returns()[i, kept].mean())
        adv = torch.randn(6, len(kept), dtype=torch.float64)
        full = torch.zeros(6, 4, dtype=torch.float64)
        full[:, kept] = adv
        log_prob = torch.randn(6, 4, dtype=torch.float64)
        whole = reinforce_loss(log_prob[None], cut.rows(slice(i, i + 1)).with_advantages(full[None]), "trajectory")
        sub = Trajectories(*(getattr(traj, k)[i : i + 1, :, kept] for k in ("obs", "actions", "rewards", "mask")))
        alone = reinforce_loss(log_prob[None][:, :, kept], sub.with_advantages(adv[None]), "trajectory")
        torch.testing.assert_close(whole, alone)
    assert (cut.mask.sum(1) > 0).sum(-1).tolist() == [2, 3]


def test_sampling_by_steps_reaches_the_budget_and_a_share_samples_the_rows_of_the_whole():
    _, learner = _learner()
    env = Navigation2D(horizon=10, tolerance=0.3)  # paths end early at the goal
    tasks = env.sample_tasks(4, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    whole = sample_steps(env, learner.policy, learner.theta(4), tasks, 3, 25, gen)
    steps, lengths = whole.mask.sum(dim=(1, 2)), whole.mask.sum(1)
    assert (steps >= 25).all() and ((steps - lengths.max(-1).values) < 25).all()
    assert whole.mask.shape[2] > 9 and (lengths.sum(0) == 0).any()  # more rounds than 25 // 10, some paths cut
    assert (lengths[lengths > 0] < 10).any()  # some paths ended at the goal
    after = torch.rand(1, generator=gen)
    part_gen = torch.Generator().manual_seed(1)
    part = sample_steps(env, learner.policy, learner.theta(2), tasks[2:], 3, 25, part_gen, slice(2, 4), 4)
    n = part.mask.shape[2]
    torch.testing.assert_close(part.mask, whole.mask[2:, :, :n])
    torch.testing.assert_close(part.actions * part.mask[..., None], (whole.actions * whole.mask[..., None])[2:, :, :n])
    assert whole.mask[2:, :, n:].sum() == 0
    torch.testing.assert_close(torch.rand(1, generator=part_gen), after)  # the caller's generator moved alike
    capped = sample_steps(env, learner.policy, learner.theta(4), tasks, 3, 25, torch.Generator().manual_seed(1), most=5)
    assert capped.mask.shape[2] == 6 and (capped.mask.sum(dim=(1, 2)) < 25).any()  # two rounds of 3, then stop
    with pytest.raises(ValueError, match="expected budget to be a positive number of steps, got 0"):
        sample_steps(env, learner.policy, learner.theta(4), tasks, 3, 0)
    with pytest.raises(ConfigError, match="'eval.step_budget' must be null"):
        load_config("navigation2d-cbfinn-maml-trpo", ["eval.step_budget=-1"])


def test_learner_refuses_what_cannot_apply():
    env = Navigation2D()
    with pytest.raises(ValueError, match="'checkpointed' meta-gradient strategy does not apply.*unrolled, first_order"):
        MAMLRL(make_policy(env), hypergrad="checkpointed")
    with pytest.raises(ValueError, match="unknown estimator 'vpg'"):
        MAMLRL(make_policy(env), estimator="vpg")
    with pytest.raises(ConfigError, match="unknown outer loop 'sgd'"):
        load_config("navigation2d-maml-trpo", ["outer.name=sgd"])


def test_gymnasium_cartpole_family_matches_a_plain_gymnasium_loop():
    gymnasium = pytest.importorskip("gymnasium")
    from allmap.rl.gym import cartpole_lengths

    env = cartpole_lengths(horizon=30)
    torch.manual_seed(0)
    learner = MAMLRL(make_policy(env, hidden=(8,)))
    tasks = env.sample_tasks(2, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    seeds = torch.randint(0, 2**31 - 1, (4,), generator=torch.Generator().manual_seed(1)).tolist()
    traj = sample(env, learner.policy, learner.theta(2), tasks, 2, gen)
    for i in range(4):
        plain = gymnasium.make("CartPole-v1").unwrapped
        plain.length = float(tasks[i // 2, 0])
        plain.polemass_length = plain.masspole * plain.length
        obs, _ = plain.reset(seed=seeds[i])
        for t in range(30):
            if traj.mask[i // 2, t, i % 2] == 0:
                break
            torch.testing.assert_close(
                traj.obs[i // 2, t, i % 2].double(), torch.as_tensor(obs).double(), atol=1e-6, rtol=0
            )
            obs, r, term, trunc, _ = plain.step(int(traj.actions[i // 2, t, i % 2]))
            assert traj.rewards[i // 2, t, i % 2] == r
            if term:
                assert t + 1 == 30 or traj.mask[i // 2, t + 1, i % 2] == 0
                break
    # an adaptation step runs on the family
    _, trajs = learner.adapt_and_sample(env, tasks, 3, steps=1, generator=gen)
    assert torch.isfinite(trajs[1].returns()).all()


def test_resume_is_exact_and_cli_reports_returns(tmp_path, capsys):
    config = load_config("navigation2d-maml-trpo", TINY)
    train_rl(config, tmp_path / "whole", progress=False)
    half = load_config("navigation2d-maml-trpo", [*TINY, "iterations=2"])
    train_rl(half, tmp_path / "half", progress=False)
    resume_rl(tmp_path / "half", ["iterations=4"], progress=False)
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("whole", "half"))
    for k in a["learner"]:
        torch.testing.assert_close(a["learner"][k], b["learner"][k], rtol=0, atol=0)
    rows = [json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert set(results["metrics"]) == {"return@0", "return@1"} and "random" in results["baselines"]
    for name in ("learning_curve.png", "returns.png", "trajectories.png"):
        assert (tmp_path / "whole" / name).stat().st_size > 1000
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "whole"), "--set", f"eval.compare={{other: {tmp_path / 'half'}}}"]) == 0
    out = capsys.readouterr().out
    assert "return@1" in out and "other" in out and "random" in out
    again = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert again["metrics"] == results["metrics"]  # the same fixed tasks and seeds: the same numbers


@pytest.mark.xfail(
    strict=False,
    reason="known defect: about half the torchrun runs abort at exit ('terminate called without an active "
    "exception', SIGABRT) after training; the numbers match whenever the run exits cleanly",
)
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Each rank samples and adapts its share of the tasks (an odd meta-batch: uneven shares); in float64, with
    a damping that conditions the CG solve (a rank-deficient Fisher amplifies rounding), the weights and
    returns equal one process's to rounding."""
    tiny = [*TINY, "dtype=float64", "outer.damping=0.1"]
    one = tmp_path / "one"
    train_rl(load_config("navigation2d-maml-trpo", tiny), one, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "allmap"]
    cmd += ["train", "navigation2d-maml-trpo", "--out", str(tmp_path / "two"), "--no-progress"]
    for s in tiny:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_checkpoint(d / "checkpoint.pt")["learner"] for d in (one, tmp_path / "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-9)
    ra, rb = (json.loads((d / "results.json").read_text())["metrics"] for d in (one, tmp_path / "two"))
    for k in ra:
        assert ra[k]["mean"] == pytest.approx(rb[k]["mean"], rel=1e-7)


def test_ppo_clip_outer_loop_with_adam_lowers_the_surrogate():
    env, learner = _learner(hidden=(8,))
    _, (pre, post) = _meta_batch(learner, env, n=4, batch=6)
    surrogate = Surrogate(learner, [pre], post, total=4, clip=0.2)
    optimizer = torch.optim.Adam(learner.policy.parameters(), lr=1e-2)
    info = PPO(epochs=5, clip=0.2).step(list(learner.policy.parameters()), surrogate, optimizer)
    with torch.no_grad():
        loss, kl = surrogate()
    assert float(loss) < info["loss"] and float(kl) > 0


def test_cli_plot_redraws_an_rl_run_and_errors_name_the_fix(tmp_path, capsys):
    train_rl(load_config("navigation2d-maml-trpo", [*TINY, "iterations=1"]), tmp_path / "r", progress=False)
    run = summarize(tmp_path / "r")
    assert (run.learner, run.family, run.status) == ("maml-rl", "navigation2d", "finished")
    assert run.wall_seconds is not None and run.wall_seconds > 0  # wall-clock "seconds" logged beside cpu_time
    (tmp_path / "r" / "returns.png").unlink()
    assert main(["plot", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "returns.png").stat().st_size > 1000
    assert main(["eval", str(tmp_path / "r"), "--shots", "3"]) == 2
    assert "set eval.trajectories=N instead" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="already holds a run"):
        train_rl(load_config("navigation2d-maml-trpo", [*TINY, "iterations=1"]), tmp_path / "r", progress=False)


@pytest.mark.parametrize("name", [n for n in list_presets() if load_config(n).get("kind") == "rl"])
def test_every_rl_preset_builds_samples_and_adapts(name):
    config = load_config(name)
    if config["env"]["name"] == "gymnasium":
        pytest.importorskip("gymnasium")
    env = build_env(config)
    learner = build_rl_learner(config, env)
    build_outer(config)
    tasks = env.sample_tasks(2, torch.Generator().manual_seed(0))
    _, trajs = learner.adapt_and_sample(env, tasks, 2, steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(trajs[1].returns()).all()

"""Process CPU time of one OML / ANML outer step (the presets' networks and tasks), and of one online head
step of the continual meta-test, with what the full protocols cost at that rate.

    flock /tmp/allmap-bench.lock python benchmarks/oml_step.py --steps 30 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from allmap.app.build import build_family, build_learner, build_optimizer
from allmap.app.config import load_config
from allmap.engine.continual import online_linear

PROTOCOL_STEPS = 20_000  # the OML code as re-run by numenta/nupic.research
#: online head steps of the continual meta-test: 15 images per class, runs + 5 sweep streams x 8 rates, per N
HEAD_STEPS = {n: 15 * n * (50 + 5 * 8) for n in (10, 50, 100, 200, 600)}


def outer_step_seconds(preset: str, steps: int, overrides: list[str]) -> float:
    config = load_config(preset, overrides)
    family = build_family(config, "train")
    torch.manual_seed(0)
    learner = build_learner(config, family)
    opt = build_optimizer(config, learner)
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 2):
        if i == 2:  # after two warm-up steps
            start = time.process_time()
        tasks = family.sample(1, g)
        opt.zero_grad()
        learner.meta_loss(tasks).backward()
        opt.step()
    return (time.process_time() - start) / steps


def head_step_seconds(classes: int, features: int, steps: int) -> float:
    x = torch.randn(1, steps, features)
    y = (torch.arange(steps) * classes // steps).unsqueeze(0)
    start = time.process_time()
    online_linear(x, y, classes, 1e-3, torch.Generator().manual_seed(0))
    return (time.process_time() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed outer steps per preset")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny networks, 2 steps (for the test suite)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    small = ["model.hidden=4"] if args.smoke else []
    steps = 2 if args.smoke else args.steps
    print(f"process CPU time, {args.threads} thread(s), {steps} timed steps")
    print(f"{'preset':<16}{'s / outer step':>16}{f'{PROTOCOL_STEPS:,} steps (min)':>24}")
    for preset in ("omniglot-oml", "omniglot-anml"):
        s = outer_step_seconds(preset, steps, small)
        print(f"{preset:<16}{s:>16.4f}{PROTOCOL_STEPS * s / 60:>24.1f}")
    feats = 64 * 9
    total = 0.0
    print(f"\nonline head ({feats} features), Adam, one run: ms / step")
    for n, count in HEAD_STEPS.items():
        s = head_step_seconds(n, feats, 300 if args.smoke else 2000)
        total += s * count
        print(f"  {n:>4} classes: {1000 * s:.3f} ms / step; 50 runs + a 5-stream sweep of 8 rates: {s * count:.0f} s")
    print(f"  one online-head method, all N: {total / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Episode sampling must never be the bottleneck: time to sample an episode batch against a training step.

    flock /tmp/allmap-bench.lock python benchmarks/episode_sampling.py

For each preset: mean seconds to sample one meta-batch (``family.sample``) and to run one training step on
it (``meta_backward`` + optimizer step, with the preset's threads and allocator settings, as ``allmap train``), over ``--steps`` steps after 2 warm-up steps, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from allmap.app.build import build_family, build_learner, build_optimizer
from allmap.app.config import load_config
from allmap.app.host import apply_host_settings


def measure(preset: str, steps: int) -> dict:
    config = load_config(preset)
    apply_host_settings(config)  # threads and allocator as allmap train sets them
    torch.manual_seed(0)
    family = build_family(config, "train")
    learner = build_learner(config, family)
    opt = build_optimizer(config, learner)
    gen = torch.Generator().manual_seed(0)
    sample_t, step_t = [], []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        tasks = family.sample(config["meta_batch"], gen)
        t1 = time.perf_counter()
        opt.zero_grad()
        learner.meta_backward(tasks)  # what the training loop calls
        opt.step()
        t2 = time.perf_counter()
        if i >= 2:
            sample_t.append(t1 - t0)
            step_t.append(t2 - t1)
    s, t = sum(sample_t) / steps, sum(step_t) / steps
    return {
        "preset": preset,
        "meta_batch": config["meta_batch"],
        "sample_s": round(s, 5),
        "step_s": round(t, 4),
        "sample_fraction_%": round(100 * s / t, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "presets", nargs="*", default=["omniglot-5w1s-protonet", "omniglot-5w1s-maml", "omniglot-20w1s-maml"]
    )
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    for preset in args.presets:
        print(json.dumps(measure(preset, args.steps)), flush=True)


if __name__ == "__main__":
    main()

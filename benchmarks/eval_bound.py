"""How fast could evaluating conv4 MAML on Omniglot episodes be on this CPU?

Counts the floating-point operations of one evaluation episode of the ``eval-600`` workload of
``peers.py`` (conv4 64 filters, 5-way 1-shot 15 queries, accuracy after 0/1/3 first-order steps) with
``torch.utils.flop_counter.FlopCounterMode``, measures float32 throughput on a large matmul and on the
episode's largest convolution at its real shape (75 images x 64 x 14 x 14, 3x3, forward, NCHW and NHWC), and
prints the episodes/s that each rate would give if every FLOP of the episode ran at it, next to the measured
rates of allmap and of a learn2learn clone/adapt loop.

    flock /tmp/allmap-bench.lock python benchmarks/eval_bound.py            # 60 episodes, ~1 minute
    python benchmarks/eval_bound.py --episodes 4 --hidden 8                  # smoke (a test runs it)

The FLOPs of an episode are the same for every implementation (the same convolutions on the same images).
An implementation's "achieved GFLOP/s" far below the convolution's rate means its time goes elsewhere:
pooling, BatchNorm, the small support batches, Python. oneDNN's 3x3 convolution can run faster than MKL's
matmul (it counts direct-convolution FLOPs; oneDNN may compute fewer), so the matmul is no upper bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (the workload and the learn2learn loop of the speed table)

import allmap  # noqa: E402
from allmap.engine.evaluate import evaluate  # noqa: E402
from allmap.nets import Conv4  # noqa: E402


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def conv_gflops(hidden: int, images: int, channels_last: bool, repeats: int = 20) -> float:
    """Throughput of the episode's second block (the largest): ``images x hidden x 14 x 14``, 3x3, forward."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(images, hidden, 14, 14).contiguous(memory_format=fmt)
    w = torch.randn(hidden, hidden, 3, 3).contiguous(memory_format=fmt)
    F.conv2d(x, w, padding=1)
    t = time.perf_counter()
    for _ in range(repeats):
        F.conv2d(x, w, padding=1)
    return 2 * images * hidden * hidden * 9 * 14 * 14 * repeats / (time.perf_counter() - t) / 1e9


def episode_gflop(learner, tasks) -> float:
    with FlopCounterMode(display=False) as counter:
        evaluate(learner, tasks[:1], steps=(0, 1, 3), chunk=1)
    return counter.get_total_flops() / 1e9


def timed(fn, episodes: int) -> float:
    fn()
    t = time.perf_counter()
    fn()
    return episodes / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args(argv)
    tasks = peers._omniglot(5, 1, 15, args.episodes, 1000, "test", random_images=args.hidden != 64)
    rows = []
    torch.manual_seed(0)
    net = Conv4(1, args.hidden, 5)
    learner = allmap.MAML(net, inner_lr=0.4, inner_steps=3, loss="cross_entropy")
    gflop = episode_gflop(learner, tasks)
    rows.append(("allmap", timed(lambda: evaluate(learner, tasks, steps=(0, 1, 3), chunk=50), len(tasks))))
    torch.manual_seed(0)
    cl = allmap.MAML(Conv4(1, args.hidden, 5, channels_last=True), inner_lr=0.4, inner_steps=3, loss="cross_entropy")
    rows.append(("allmap, channels_last", timed(lambda: evaluate(cl, tasks, steps=(0, 1, 3), chunk=50), len(tasks))))
    try:
        w = peers.workloads(smoke=False)["eval-600"]
        model = peers.build_model(w, "learn2learn")
        if args.hidden != 64:
            torch.manual_seed(0)
            model = Conv4(1, args.hidden, 5)
            peers._native_batch_statistics(model)
        rows.append(("learn2learn loop", timed(peers.eval_run("learn2learn", w, model, tasks), len(tasks))))
    except ImportError as err:
        print(f"note: learn2learn skipped ({err})")
    peaks = [
        ("float32 matmul 2048^2", matmul_gflops()),
        ("3x3 conv, 75 images, NCHW", conv_gflops(args.hidden, 75, False)),
        ("3x3 conv, 75 images, NHWC", conv_gflops(args.hidden, 75, True)),
    ]
    print(
        f"threads={torch.get_num_threads()}  FLOPs per episode: {gflop:.3f} GFLOP (FlopCounterMode, convolutions "
        "and matmuls)"
    )
    print("| implementation | episodes/s | achieved GFLOP/s |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate * gflop:.1f} |")
    print("\n| throughput of | GFLOP/s | bound, episodes/s | bound / learn2learn |")
    print("|---|---|---|---|")
    l2l = dict(rows).get("learn2learn loop")
    for name, g in peaks:
        bound = g / gflop
        ratio = f"{bound / l2l:.2f}x" if l2l else "n/a"
        print(f"| {name} | {g:.1f} | {bound:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

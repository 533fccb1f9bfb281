"""What the CPU allocator setting (``retain_memory``) and ``channels_last`` do to a ProtoNets training step.

    flock /tmp/allmap-bench.lock python benchmarks/allocator.py            # 60-way episodes, ~2 min
    python benchmarks/allocator.py --ways 5 --steps 2                       # tiny, seconds (a test runs it)

Each configuration runs in its own process (``retain_freed_memory`` is process-wide and one-way): a conv4-64
ProtoNets learner, one fixed 1-shot 5-query episode of ``--ways`` classes (real Omniglot if available, else
random images), ``--warmup`` untimed then ``--steps`` timed steps of zero_grad + meta_backward + Adam. Printed
per configuration: seconds per step, kernel (system) seconds per step, minor page faults per step, and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import allmap  # noqa: E402
from allmap.app.host import retain_freed_memory  # noqa: E402

CONFIGS = [(False, False), (False, True), (True, False), (True, True)]  # (retain_memory, channels_last)


def episode(ways: int) -> allmap.TaskBatch:
    try:
        family = allmap.tasks.Omniglot(split="train", ways=ways, shots=1, queries=5)
        return family.sample(1, torch.Generator().manual_seed(0))
    except (OSError, ValueError, RuntimeError):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(ways)
        return allmap.TaskBatch(
            torch.rand(1, ways, 1, 28, 28, generator=g),
            y[None],
            torch.rand(1, 5 * ways, 1, 28, 28, generator=g),
            y.repeat_interleave(5)[None],
        )


def child(retain: bool, channels_last: bool, ways: int, steps: int, warmup: int) -> dict:
    took = retain_freed_memory() if retain else False
    torch.manual_seed(0)
    learner = allmap.ProtoNet(allmap.nets.Conv4(1, 64, channels_last=channels_last))
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    tasks = episode(ways)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        learner.meta_backward(tasks)
        opt.step()

    for _ in range(warmup):
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "retain_memory": retain,
        "took_effect": took,
        "channels_last": channels_last,
        "s_per_step": seconds,
        "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / steps,
        "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
        "peak_rss_mb": r1.ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ways", type=int, default=60)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("RETAIN", "CHANNELS_LAST"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        retain, cl = (v == "1" for v in args.child)
        print(json.dumps(child(retain, cl, args.ways, args.steps, args.warmup)))
        return 0
    rows = []
    for retain, cl in CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(int(retain)),
            str(int(cl)),
            "--ways",
            str(args.ways),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["s_per_step"]
    print(
        f"ProtoNets conv4-64, one {args.ways}-way 1-shot 5-query episode, {torch.get_num_threads()} threads, "
        f"mean over {args.steps} steps after {args.warmup} untimed"
    )
    print("| retain_memory | channels_last | s/step | speed-up | kernel s/step | page faults/step | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        retain = f"{r['retain_memory']}" + ("" if r["took_effect"] or not r["retain_memory"] else " (no effect)")
        print(
            f"| {retain} | {r['channels_last']} | {r['s_per_step']:.3f} | {base / r['s_per_step']:.2f}x | "
            f"{r['sys_s_per_step']:.3f} | {r['faults_per_step']:,.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

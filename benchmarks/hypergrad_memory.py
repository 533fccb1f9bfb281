"""Peak memory and time of one meta-gradient against the number of inner steps, per strategy.

Protocol: MAML on conv4 (4 x [conv3x3 64, BatchNorm, ReLU, maxpool], linear head), Omniglot
5-way 5-shot, 5 queries per class, meta-batch 2, float32, inner SGD with lr 0.4, tasks one at a time
(``vectorize=False``), strategies unrolled, checkpointed, truncated(k=5) and implicit (lam=2, 5 CG
iterations), inner steps 1, 5, 10, 20, 50.

Each configuration runs in its own process so peaks do not mix: the child loads one fixed meta-batch, builds
the learner, runs the network once without gradients (kernel set-up), then measures its first meta-gradient
(forward and backward). "added" is the peak resident set size during that meta-gradient minus the RSS just
before it (the peak is the larger of ``getrusage(ru_maxrss)`` and a 1 ms sampler of ``/proc/self/statm``;
glibc is told to serve blocks above 64 KiB by mmap so freed tensors leave the RSS); time is the fastest of
``--repeats`` meta-gradients (the machine is shared; the minimum is the least disturbed). Run under the
shared lock::

    flock /tmp/allmap-bench.lock python benchmarks/hypergrad_memory.py

``--data random`` uses random 28x28 images instead of Omniglot (same shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

STRATEGIES = ("unrolled", "checkpointed", "truncated(k=5)", "implicit(lam=2.0, iterations=5, on_fail='ignore')")
LABELS = {s: s.split("(")[0] + ("(5)" if s.startswith("truncated") else "") for s in STRATEGIES}
STEPS = (1, 5, 10, 20, 50)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """Polls the resident set size every ``interval`` seconds (torch releases the GIL in its kernels)."""

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss_bytes())


def make_batch(path: str, data: str, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    if data == "omniglot":
        from allmap.tasks.omniglot import Omniglot

        tasks = Omniglot(split="train", ways=5, shots=5, queries=5).sample(2, gen)
    else:
        from allmap.tasks.batch import TaskBatch

        y = torch.arange(5).repeat_interleave(5).expand(2, 25).contiguous()
        tasks = TaskBatch(
            torch.rand(2, 25, 1, 28, 28, generator=gen), y, torch.rand(2, 25, 1, 28, 28, generator=gen), y
        )
    torch.save({"sx": tasks.support_x, "sy": tasks.support_y, "qx": tasks.query_x, "qy": tasks.query_y}, path)


def child(args: argparse.Namespace) -> None:
    import gc

    import torch

    import allmap
    from allmap.nets import Conv4

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = torch.load(args.batch)
    tasks = allmap.TaskBatch(d["sx"], d["sy"], d["qx"], d["qy"])

    def learner(steps: int) -> allmap.MAML:
        torch.manual_seed(0)
        return allmap.MAML(
            Conv4(out_features=5),
            inner_lr=0.4,
            inner_steps=steps,
            loss="cross_entropy",
            hypergrad=args.strategy,
            vectorize=False,
        )

    def meta_gradient(m: allmap.MAML) -> None:
        m.zero_grad(set_to_none=True)
        m.meta_loss(tasks).backward()

    m = learner(args.inner_steps)
    with torch.no_grad():  # initialise kernels and thread pools outside the measurement
        m.model(tasks.support_x[0])
    gc.collect()
    before = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    meta_gradient(m)
    first = time.perf_counter() - start
    peak = max(sampler.stop(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    grad = torch.cat([p.grad.flatten() for p in m.parameters()])
    times = [first]
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        meta_gradient(m)
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "added_mb": (peak - before) / 2**20,
                "base_mb": before / 2**20,
                "time_s": min(times),
                "grad_norm": float(grad.norm()),
            }
        )
    )


def interleaved(args: argparse.Namespace, batch: str) -> None:
    """Time ratio checkpointed / unrolled with the two meta-gradients alternating in one process, so both see
    the same machine load (memory is not measured here)."""
    import torch

    import allmap
    from allmap.nets import Conv4

    torch.set_num_threads(args.threads)
    d = torch.load(batch)
    tasks = allmap.TaskBatch(d["sx"], d["sy"], d["qx"], d["qy"])
    learners = {}
    for strategy in ("unrolled", "checkpointed"):
        torch.manual_seed(0)
        learners[strategy] = allmap.MAML(
            Conv4(out_features=5),
            inner_lr=0.4,
            inner_steps=args.interleave,
            loss="cross_entropy",
            hypergrad=strategy,
            vectorize=False,
        )
    times: dict[str, list[float]] = {k: [] for k in learners}
    for m in learners.values():  # warm-up (kernel selection, allocator), not timed
        m.meta_loss(tasks).backward()
    for _ in range(args.repeats):
        for name, m in learners.items():
            m.zero_grad(set_to_none=True)
            start = time.perf_counter()
            m.meta_loss(tasks).backward()
            times[name].append(time.perf_counter() - start)
    u, c = min(times["unrolled"]), min(times["checkpointed"])
    print(
        f"interleaved, {args.interleave} inner steps, fastest of {args.repeats}: unrolled {u:.2f} s, "
        f"checkpointed {c:.2f} s, ratio {c / u:.2f} (all: {json.dumps(times)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("omniglot", "random"), default="omniglot")
    parser.add_argument("--steps", type=int, nargs="*", default=list(STEPS))
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of each measurement (1: stable timings on a shared 2-core machine)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead of the table: time unrolled and checkpointed alternately at STEPS inner steps",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    parser.add_argument("--inner-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        batch = os.path.join(tmp, "batch.pt")
        make_batch(batch, args.data, args.seed)
        if args.interleave:
            interleaved(args, batch)
            return
        for strategy in args.strategies:
            for steps in args.steps:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "--strategy",
                    strategy,
                    "--inner-steps",
                    str(steps),
                    "--batch",
                    batch,
                    "--repeats",
                    str(args.repeats),
                    "--threads",
                    str(args.threads),
                ]
                # large blocks through mmap, so freed tensors leave the RSS at once and peaks do not hide in
                # memory the allocator kept from earlier work
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"{strategy} at {steps} steps failed:\n{out.stderr}")
                results[(strategy, steps)] = json.loads(out.stdout.strip().splitlines()[-1])
                r = results[(strategy, steps)]
                print(
                    f"  {LABELS.get(strategy, strategy):<14} {steps:>3} steps: +{r['added_mb']:7.1f} MB "
                    f"{r['time_s']:7.3f} s  |g|={r['grad_norm']:.6g}",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"\nMAML conv4, Omniglot 5-way 5-shot (5 queries), meta-batch 2, per-task backward ({args.data} data, "
        f"{args.threads} thread(s)); peak RSS added by one meta-gradient (MB) / fastest of {args.repeats} (s)\n"
    )
    head = f"{'strategy':<14}" + "".join(f"{s:>18}" for s in args.steps)
    print(head)
    print("-" * len(head))
    for strategy in args.strategies:
        cells = "".join(
            f"{results[(strategy, s)]['added_mb']:>9.1f} /{results[(strategy, s)]['time_s']:>6.2f}s" for s in args.steps
        )
        print(f"{LABELS.get(strategy, strategy):<14}{cells}")
    if "unrolled" in args.strategies and "checkpointed" in args.strategies:
        print()
        for s in args.steps:
            u, c = results[("unrolled", s)], results[("checkpointed", s)]
            print(
                f"{s:>3} steps: checkpointed/unrolled memory {c['added_mb'] / u['added_mb']:.2f}, "
                f"time {c['time_s'] / u['time_s']:.2f}, same |g|: {abs(c['grad_norm'] - u['grad_norm']) < 1e-4 * u['grad_norm']}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}@{k[1]}": v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()

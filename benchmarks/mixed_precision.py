"""Mixed precision (``model.precision: bfloat16``) against float32 on a conv4 ProtoNets episode.

    flock /tmp/allmap-bench.lock python benchmarks/mixed_precision.py           # 60-way episodes, ~1 min
    python benchmarks/mixed_precision.py --ways 5 --steps 2 --hidden 8          # tiny, seconds (a test runs it)

Both models start from the same weights and see the same fixed 1-shot 5-query episode of ``--ways`` classes
(real Omniglot if available, else random images), in NHWC layout with the allocator setting of ``allmap
train``. Training steps (zero_grad + meta_backward + Adam) of the two alternate, so both see the same machine
load; printed per precision: seconds per step and the speed-up. Then the numerical cost: the relative
difference of bfloat16's embedding and meta-gradient from float32's, and the cosine between the gradients.
Whether a CPU runs bfloat16 fast depends on it (AVX-512 BF16 or AMX); without, torch emulates it, many times
slower, and ``precision: auto`` runs float32 there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocator import episode  # noqa: E402  (the same fixed episode as the allocator benchmark)

import allmap  # noqa: E402
from allmap.app.host import retain_freed_memory  # noqa: E402
from allmap.nets.conv import PRECISIONS, native_bfloat16  # noqa: E402


def learner(precision: str, hidden: int) -> allmap.ProtoNet:
    torch.manual_seed(0)
    return allmap.ProtoNet(allmap.nets.Conv4(1, hidden, channels_last=True, precision=precision))


def gradient(model: allmap.ProtoNet, tasks: allmap.TaskBatch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model.meta_backward(tasks)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ways", type=int, default=60)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    retain_freed_memory()
    tasks = episode(args.ways)
    models = {name: learner(name, args.hidden) for name in PRECISIONS}
    # the numerical cost, from identical weights
    with torch.no_grad():
        x = tasks.query_x[0]
        z = {name: m.model(x).double() for name, m in models.items()}
    g = {name: gradient(m, tasks) for name, m in models.items()}
    err_z = float((z["bfloat16"] - z["float32"]).norm() / z["float32"].norm())
    err_g = float((g["bfloat16"] - g["float32"]).norm() / g["float32"].norm())
    cosine = float(torch.nn.functional.cosine_similarity(g["bfloat16"], g["float32"], dim=0))
    # the speed, interleaved
    opts = {name: torch.optim.Adam(m.parameters(), 1e-3) for name, m in models.items()}
    seconds = {name: 0.0 for name in PRECISIONS}
    for i in range(args.warmup + args.steps):
        for name, m in models.items():
            start = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            m.meta_backward(tasks)
            opts[name].step()
            if i >= args.warmup:
                seconds[name] += time.perf_counter() - start
    print(
        f"conv4-{args.hidden} ProtoNets, one {args.ways}-way 1-shot 5-query episode, {args.steps} steps each "
        f"(interleaved), {torch.get_num_threads()} threads; native bfloat16 on this CPU: {native_bfloat16('cpu')} "
        f"('auto' runs {'bfloat16' if native_bfloat16('cpu') else 'float32'})\n"
    )
    print("| precision | s/step | speed-up |")
    print("|---|---|---|")
    for name in PRECISIONS:
        per = seconds[name] / args.steps
        print(f"| {name} | {per:.4f} | {seconds['float32'] / seconds[name]:.2f}x |")
    print(
        json.dumps(
            {
                "embedding_rel_diff": round(err_z, 5),
                "gradient_rel_diff": round(err_g, 5),
                "gradient_cosine": round(cosine, 6),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

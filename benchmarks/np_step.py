"""A CNP training step through allmap against a plain PyTorch script of the same model on the same batch.

    flock /tmp/allmap-bench.lock python benchmarks/np_step.py --steps 300     # about a minute
    python benchmarks/np_step.py --smoke                                      # seconds; what the tests call

Both sides hold the same weights (the plain model is written here from scratch, with nn.Linear layers, and
loads allmap's weights) and take the same Adam steps on the same fixed GP meta-batches (the gp-cnp preset's
tasks: batch 64, 3..9 context and 2..9 further targets). A step is zero_grad + loss + backward + Adam step;
allmap's loss is ``learner.meta_backward(tasks)``. The two run in alternating blocks in one process, one
intra-op thread, and the median step time of each is reported with their ratio; in float64 the two
losses and gradients are compared first. It also times the ANP step and sampling a meta-batch, and states
what the notebook protocol (200,000 iterations of batch 64) costs at those rates.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import allmap
from allmap.nets import MLP


class PlainCNP(nn.Module):
    """The CNP of Garnelo et al. 2018 in plain PyTorch: encoder 2-128x4, mean, decoder 129-128-128-2."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(2, width)] + [nn.Linear(width, width) for _ in range(3)])
        self.dec = nn.ModuleList([nn.Linear(width + 1, width), nn.Linear(width, width), nn.Linear(width, 2)])

    @staticmethod
    def mlp(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for layer in layers[:-1]:
            h = F.relu(layer(h))
        return layers[-1](h)

    def loss(self, cx, cy, tx, ty) -> torch.Tensor:
        r = self.mlp(self.enc, torch.cat([cx, cy], -1)).mean(1, keepdim=True).expand(-1, tx.shape[1], -1)
        mean, raw = self.mlp(self.dec, torch.cat([r, tx], -1)).chunk(2, -1)
        std = 0.1 + 0.9 * F.softplus(raw)
        return -torch.distributions.Normal(mean, std).log_prob(ty).mean()

    def load_from(self, cnp: allmap.CNP) -> None:
        """Copy allmap's weights (encoder ``model``, ``decoder``) into this model, layer by layer."""
        ours = [m for m in cnp.model.modules() if isinstance(m, nn.Linear)]
        ours += [m for m in cnp.decoder.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for mine, theirs in zip(list(self.enc) + list(self.dec), ours, strict=True):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)


def agreement(batch: allmap.TaskBatch) -> float:
    """Largest relative difference of loss and gradients between allmap's CNP and the plain one, float64."""
    torch.manual_seed(0)
    cnp = allmap.CNP(MLP([2, 128, 128, 128, 128])).double()
    plain = PlainCNP().double()
    plain.load_from(cnp)
    b = batch.to(dtype=torch.float64)
    loss_a = cnp.meta_backward(b)
    loss_b = plain.loss(b.support_x, b.support_y, b.query_x, b.query_y)
    loss_b.backward()
    ga = [p.grad for m in (cnp.model, cnp.decoder) for p in m.parameters()]
    gb = [p.grad for p in plain.parameters()]
    worst = abs(float(loss_a - loss_b.detach())) / abs(float(loss_b.detach()))
    for a, c in zip(ga, gb, strict=True):
        worst = max(worst, float((a - c).norm() / c.norm()))
    return worst


def timed(step, batches: list, steps: int) -> list[float]:
    out = []
    for i in range(steps):
        t = time.perf_counter()
        step(batches[i % len(batches)])
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per side (in blocks of 50)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check the script runs")
    args = parser.parse_args(argv)
    steps = 2 if args.smoke else args.steps
    block = 1 if args.smoke else 50
    torch.set_num_threads(args.threads)
    family = allmap.tasks.GPRegression()
    gen = torch.Generator().manual_seed(0)
    batches = [family.sample(64, gen) for _ in range(2 if args.smoke else 8)]
    print(f"float64 agreement, allmap CNP vs plain PyTorch (loss and gradients, relative): {agreement(batches[0]):.1e}")

    torch.manual_seed(0)
    cnp = allmap.CNP(MLP([2, 128, 128, 128, 128]))
    plain = PlainCNP()
    plain.load_from(cnp)
    anp = allmap.ANP(MLP([2, 128, 128, 128, 128]))
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in (("a", cnp), ("p", plain), ("n", anp))}

    def allmap_step(b):
        opts["a"].zero_grad()
        cnp.meta_backward(b)
        opts["a"].step()

    def plain_step(b):
        opts["p"].zero_grad()
        plain.loss(b.support_x, b.support_y, b.query_x, b.query_y).backward()
        opts["p"].step()

    def anp_step(b):
        opts["n"].zero_grad()
        anp.meta_backward(b)
        opts["n"].step()

    for fn in (allmap_step, plain_step, anp_step):  # warm up
        timed(fn, batches, 1 if args.smoke else 3)
    times: dict[str, list[float]] = {"allmap CNP": [], "plain CNP": [], "allmap ANP": []}
    for _ in range(max(1, steps // block)):  # alternate blocks, so both see the same machine load
        times["allmap CNP"] += timed(allmap_step, batches, block)
        times["plain CNP"] += timed(plain_step, batches, block)
        times["allmap ANP"] += timed(anp_step, batches, block)
    t = time.perf_counter()
    for _ in range(steps):
        family.sample(64, gen)
    sample = (time.perf_counter() - t) / steps
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median step, one thread ({len(times['plain CNP'])} steps each, batch 64, GP tasks of gp-cnp):")
    for k, v in med.items():
        print(f"  {k:<11} {1e3 * v:7.3f} ms")
    print(f"  sampling a GP meta-batch {1e3 * sample:7.3f} ms")
    print(f"allmap CNP / plain CNP: {med['allmap CNP'] / med['plain CNP']:.3f}x")
    for k in ("allmap CNP", "allmap ANP"):
        total = 200_000 * (med[k] + sample)
        print(f"200,000 iterations of batch 64 ({k}, step + sampling): {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

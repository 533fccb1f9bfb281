"""An independent reference for the ProtoNets preset: a plain PyTorch script of the ProtoNets recipe
(conv4-64, 60-way 1-shot 5-query training episodes, Adam 1e-3 halved every 2,000 episodes), written without
allmap's learner, training loop or episode sampler. Only the preprocessed Omniglot tensor and the 600 fixed
test episodes (seed 1000, as the preset's) come from allmap, so both score the same images.

    flock /tmp/allmap-bench.lock python benchmarks/protonet_reference.py --minutes 5 10 20
    flock /tmp/allmap-bench.lock python benchmarks/protonet_reference.py --protocol shuffled --minutes 5 10 20
    python benchmarks/protonet_reference.py --minutes 0.05 --test-episodes 5      # smoke (a test runs it)

Prints one JSON line per mark: training minutes (evaluation excluded), episodes, learning rate, and 5-way
1-shot accuracy (mean, 95% CI) with BatchNorm in eval mode, as the ProtoNets code evaluates.
"""

import argparse
import json
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from allmap.app.host import retain_freed_memory
from allmap.tasks.omniglot import DEFAULT_ROOT, PROTOCOLS, Omniglot, load_omniglot

p = argparse.ArgumentParser()
p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20])
p.add_argument("--every", type=int, default=2000, help="halve the learning rate every this many episodes")
p.add_argument("--root", default=DEFAULT_ROOT)
p.add_argument("--test-episodes", type=int, default=600)
p.add_argument("--resize", default="bilinear")
p.add_argument(
    "--protocol",
    default="standard",
    choices=["standard", "shuffled"],
    help="Omniglot split: standard (Vinyals) or shuffled (MAML's random split of the characters)",
)
p.add_argument("--channels-last", action="store_true")
p.add_argument("--retain", action="store_true", help="keep freed memory (as allmap train does)")
args = p.parse_args()
if args.retain:
    retain_freed_memory()
torch.manual_seed(0)
random.seed(0)
data = load_omniglot(args.root, resize=args.resize)
train = data.split(PROTOCOLS[args.protocol]["train"]).images  # [1200, 20, 28, 28]
classes = [(c, r) for c in range(train.shape[0]) for r in range(4)]
test_family = Omniglot(args.root, split="test", protocol=args.protocol, ways=5, shots=1, queries=15, resize=args.resize)
test = test_family.sample(args.test_episodes, torch.Generator().manual_seed(1000))


def block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))


net = nn.Sequential(block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten())
fmt = torch.channels_last if args.channels_last else torch.contiguous_format
net = net.to(memory_format=fmt)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.every, gamma=0.5)


def episode(ways=60, shots=1, queries=5):
    picked = random.sample(classes, ways)
    xs = []
    for c, r in picked:
        idx = random.sample(range(20), shots + queries)
        xs.append(torch.rot90(train[c, idx], r, dims=(-2, -1)))
    x = torch.stack(xs)  # [ways, K+Q, 28, 28]
    return x[:, :shots].reshape(-1, 1, 28, 28), x[:, shots:].reshape(-1, 1, 28, 28)


def loss_acc(s, q, ways, shots, queries):
    z = net(torch.cat([s, q]).contiguous(memory_format=fmt))
    protos = z[: ways * shots].view(ways, shots, -1).mean(1)
    d = torch.cdist(z[ways * shots :], protos) ** 2
    y = torch.arange(ways).repeat_interleave(queries)
    return F.cross_entropy(-d, y), (d.argmin(1) == y).float().mean()


def evaluate():
    net.eval()
    accs = []
    with torch.no_grad():
        for i in range(len(test)):
            # allmap's test episodes: support/query ordered class by class, labels 0..N-1
            _, acc = loss_acc(test.support_x[i], test.query_x[i], 5, 1, 15)
            accs.append(float(acc))
    net.train()
    a = torch.tensor(accs)
    return round(100 * float(a.mean()), 3), round(100 * 1.96 * float(a.std()) / len(a) ** 0.5, 3)


marks = sorted(args.minutes)
start, paused, it = time.perf_counter(), 0.0, 0
while marks:
    s, q = episode()
    loss, _ = loss_acc(s, q, 60, 1, 5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    it += 1
    if (time.perf_counter() - start - paused) / 60 >= marks[0]:
        t0 = time.perf_counter()
        print(
            json.dumps({"minutes": marks.pop(0), "episodes": it, "lr": opt.param_groups[0]["lr"], "5w1s": evaluate()}),
            flush=True,
        )
        paused += time.perf_counter() - t0

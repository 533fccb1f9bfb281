"""The continual evaluation of incremental sine regression (the OML code's sine protocol, Javed & White 2019).

Each run draws 10 sine functions (:class:`~allmap.tasks.streams.IncrementalSine`: function ``k`` in slot
``k`` of the one-hot part of the input); the training stream is ``points`` points of function 1, then of
function 2, ..., one pass, one point per SGD step, only the head learning (it starts at the learner's own
head: meta-learned for OML, pretrained for the baseline; the OML code's regression evaluation does not
reset it). After each function, the **MSE over all functions seen so far** is measured on ``held_out``
fresh points of each of them. The head's learning rate is chosen by a sweep over ``lrs``: on each of
``sweep_runs`` streams the rate with the lowest training-stream MSE after the pass wins, and the most
frequent winner is used on ``runs`` new streams (the same streams for every method). Reported: mean ± 95%
CI (1.96·std/sqrt(n)) over the runs.

Methods: the online head on each run's representation; the same head trained offline, ``oracle_epochs``
shuffled passes over the same points at the chosen rate (the i.i.d. upper bound of that representation); the
whole network trained online from scratch on the stream (Adam, learning rate from ``scratch_lrs`` by
training-stream MSE on one sweep stream).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from allmap.app.continual import features_of, representation, save_continual
from allmap.engine.continual import online_regression
from allmap.engine.evaluate import summarize
from allmap.tasks.streams import IncrementalSine

__all__ = [
    "SineProtocol",
    "SineMethod",
    "sine_streams",
    "evaluate_sine",
    "scratch_sine",
    "format_sine_table",
    "sine_figure",
    "sine_meta_test",
]


@dataclass(frozen=True)
class SineProtocol:
    """The settings of the incremental sine evaluation."""

    slots: int = 10
    points: int = 10
    held_out: int = 100
    runs: int = 50
    sweep_runs: int = 5
    lrs: tuple[float, ...] = (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)
    oracle_epochs: int = 10
    scratch_lrs: tuple[float, ...] = (0.01, 0.003, 0.001, 0.0003)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("slots", "points", "held_out", "runs", "sweep_runs", "oracle_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SineProtocol: expected {name} >= 1, got {getattr(self, name)!r}.")

    def describe(self) -> str:
        return (
            f"incremental sine regression (OML's protocol): {self.slots} functions in sequence, {self.points} "
            f"points each, one pass, one point per SGD step, only the head learns; MSE over the functions seen, "
            f"{self.held_out} held-out points each; head lr by a sweep of {len(self.lrs)} rates on "
            f"{self.sweep_runs} streams (training-stream MSE); {self.runs} runs (seed {self.seed}); "
            f"mean ± 95% CI (1.96·std/sqrt(n))"
        )


@dataclass
class SineMethod:
    """A row of the table: the frozen representation ``embed``, the head it starts from, the head kind."""

    name: str
    embed: Callable[[Tensor], Tensor]
    weight: Tensor  # [F]
    bias: Tensor  # []
    head: str = "online"  # or "offline"


def sine_streams(protocol: SineProtocol, runs: int, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``runs`` streams (seeded by the protocol's seed and ``index``): inputs ``[R, slots * points, slots + 1]``
    and targets ``[R, slots * points]`` function by function, then the held-out points, the same layout."""
    g = torch.Generator().manual_seed(protocol.seed * 7_919 + index)
    family = IncrementalSine(protocol.slots, protocol.points, protocol.held_out)
    info = family.functions(runs, g)
    x, y = family.points(info, protocol.points, g)
    xh, yh = family.points(info, protocol.held_out, g)
    return x, y[..., 0], xh, yh[..., 0]


def _seen_mse(pred: Tensor, y: Tensor, slots: int) -> Tensor:
    """MSE over the first ``k`` functions for ``k = 1..slots``: ``pred, y [R, slots * P]`` -> ``[R, slots]``."""
    per = ((pred - y) ** 2).view(pred.shape[0], slots, -1).mean(-1)
    return per.cumsum(1) / torch.arange(1, slots + 1, dtype=per.dtype)


def _predict(head: tuple[Tensor, Tensor], f: Tensor) -> Tensor:
    return torch.einsum("rmf,rf->rm", f, head[0]) + head[1].unsqueeze(1)


def _method_mse(
    method: SineMethod, protocol: SineProtocol, streams: tuple, lr: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Held-out MSE over the functions seen after each function ``[R, slots]`` and training-stream MSE after
    the pass ``[R]``."""
    x, y, xh, yh = streams
    f, fh = features_of(method.embed, x), features_of(method.embed, xh)
    s, p = protocol.slots, protocol.points
    weight, bias = method.weight.to(f.device), method.bias.to(f.device)
    if method.head == "offline":
        g = torch.Generator().manual_seed(protocol.seed)
        order = torch.cat([torch.rand(x.shape[:2], generator=g).argsort(1) for _ in range(protocol.oracle_epochs)], 1)
        rows = torch.arange(x.shape[0]).unsqueeze(1)
        final, _ = online_regression(f[rows, order], y[rows, order], weight, bias, lr)
        heads = [final] * s  # trained offline on the whole stream: no order to follow
    else:
        final, heads = online_regression(f, y, weight, bias, lr, [p * (k + 1) for k in range(s)])
    held = torch.stack([_seen_mse(_predict(h, fh), yh, s)[:, k] for k, h in enumerate(heads)], 1)
    stream = ((_predict(final, f) - y) ** 2).mean(1)
    return held, stream


def _choose(protocol: SineProtocol, lrs: Sequence[float], stream_mse: Callable[[int, Tensor], Tensor]) -> tuple:
    """The most frequent best rate (lowest training-stream MSE; ties: the larger rate) over the sweep streams."""
    winners = []
    for s in range(protocol.sweep_runs):
        mse = torch.nan_to_num(stream_mse(s, torch.tensor(lrs, dtype=torch.float64)), nan=math.inf)
        winners.append(float(lrs[int(mse.argmin())]))
    counts = Counter(winners)
    return max(counts, key=lambda lr: (counts[lr], lr)), winners


def _record(held: Tensor, stream: Tensor, lr: float, winners: list[float]) -> dict[str, Any]:
    return {
        "lr": lr,
        "sweep_winners": winners,
        "runs": held.shape[0],
        "mse_seen_held_out": [summarize(held[:, k]) for k in range(held.shape[1])],
        "mse_stream": summarize(stream),
    }


def evaluate_sine(method: SineMethod, protocol: SineProtocol) -> dict[str, Any]:
    """One method: the swept rate, the held-out MSE over the functions seen after each function and the
    training-stream MSE after the pass, mean ± 95% CI over ``protocol.runs`` streams."""
    online = SineMethod(method.name, method.embed, method.weight, method.bias, "online")

    def sweep_mse(s: int, lrs: Tensor) -> Tensor:
        streams = [t.expand(len(lrs), *t.shape[1:]) for t in sine_streams(protocol, 1, 100_000 + s)]
        return _method_mse(online, protocol, streams, lrs)[1]

    lr, winners = _choose(protocol, protocol.lrs, sweep_mse)
    held, stream = _method_mse(method, protocol, sine_streams(protocol, protocol.runs, 0), lr)
    return {"head": method.head, **_record(held, stream, lr, winners)}


def _scratch_run(make: Callable[[int], nn.Module], protocol: SineProtocol, streams: tuple, lr: float, seed: int):
    """The whole network from a fresh initialisation, Adam on one point per step: held-out MSE over the
    functions seen after each function ``[slots]`` and training-stream MSE ``[]``."""
    x, y, xh, yh = streams
    model = make(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    held = []
    for t in range(x.shape[0]):
        loss = nn.functional.mse_loss(model(x[t : t + 1])[:, 0], y[t : t + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (t + 1) % protocol.points == 0:
            with torch.no_grad():
                held.append(_seen_mse(model(xh)[None, :, 0], yh[None], protocol.slots)[0, t // protocol.points])
    with torch.no_grad():
        return torch.stack(held), ((model(x)[:, 0] - y) ** 2).mean()


def scratch_sine(make: Callable[[int], nn.Module], protocol: SineProtocol, runs: int) -> dict[str, Any]:
    """The network of the run learned whole, online, from scratch on ``runs`` of the protocol's streams."""
    sweep = sine_streams(protocol, 1, 100_000)
    one = [t[0] for t in sweep]

    def sweep_mse(s: int, lrs: Tensor) -> Tensor:
        return torch.stack([_scratch_run(make, protocol, one, float(lr), 0)[1] for lr in lrs])

    lr, winners = _choose(SineProtocol(**{**asdict(protocol), "sweep_runs": 1}), protocol.scratch_lrs, sweep_mse)
    streams = sine_streams(protocol, protocol.runs, 0)
    res = [_scratch_run(make, protocol, [t[r] for t in streams], lr, r + 1) for r in range(min(runs, protocol.runs))]
    return {
        "head": "scratch",
        **_record(torch.stack([h for h, _ in res]), torch.stack([s for _, s in res]), lr, winners),
    }


def format_sine_table(results: dict[str, dict[str, Any]], protocol: SineProtocol) -> str:
    """Methods by rows; columns: the held-out MSE over the functions seen after each function (mean±ci95),
    then the training-stream MSE after the pass and the learning rate."""
    width = max(len(k) for k in results) + 2
    cols = [f"after {k + 1}" for k in range(protocol.slots)]
    lines = [
        protocol.describe(),
        "",
        "HELD-OUT MSE over the functions seen so far, after each function; then TRAINING-STREAM MSE, lr, runs",
        " " * width + "".join(f"{c:>13}" for c in cols) + f"{'stream':>13}{'lr':>8}{'runs':>6}",
    ]
    for name, r in results.items():
        cells = [f"{c['mean']:.2f}±{c['ci95']:.2f}" for c in (*r["mse_seen_held_out"], r["mse_stream"])]
        lr = "-" if math.isnan(r["lr"]) else f"{r['lr']:g}"
        lines.append(f"{name:<{width}}" + "".join(f"{c:>13}" for c in cells) + f"{lr:>8}{r['runs']:>6}")
    return "\n".join(lines)


def sine_figure(results: dict[str, dict[str, Any]], protocol: SineProtocol):
    """The held-out MSE over the functions seen against the number of functions learned, one line per
    method, 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(1, protocol.slots + 1))
    for name, r in results.items():
        cells = r["mse_seen_held_out"]
        ax.errorbar(xs, [c["mean"] for c in cells], yerr=[c["ci95"] for c in cells], marker="o", capsize=3, label=name)
    ax.set_xlabel("functions learned")
    ax.set_ylabel("held-out MSE over the functions seen")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Incremental sine regression: one pass, one point per step; mean ± 95% CI over runs", fontsize=10)
    fig.tight_layout()
    return fig


def sine_methods(run_dir: str, oracle: bool = False) -> list[SineMethod]:
    """The rows of one run folder: the online head on its representation, starting from its own head (and,
    with ``oracle``, the same head trained offline on the same points)."""
    from allmap.app.continual import method_label
    from allmap.app.runs import load, read_config

    label = method_label(read_config(run_dir))
    learner = load(run_dir)  # on the run's device
    head = learner.model.head
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ValueError(
            f"allmap continual: the sine protocol needs a model with a linear head of one output (an mlp ending "
            f"in 1), got {head!r} in {run_dir}."
        )
    weight, bias = head.weight.detach()[0], head.bias.detach()[0]
    embed = representation(learner)
    name = label if label in ("OML", "ANML") else f"{label} + online head"
    methods = [SineMethod(name, embed, weight, bias, "online")]
    if oracle:
        methods.append(SineMethod(f"{label} + offline head (i.i.d. upper bound)", embed, weight, bias, "offline"))
    return methods


def sine_meta_test(
    run_dir: str,
    others: Sequence[str] = (),
    protocol: SineProtocol | None = None,
    oracle: bool = True,
    scratch_runs: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """The incremental sine evaluation of ``run_dir`` beside the runs ``others``, written into ``run_dir``:
    ``continual.png`` and the ``continual`` entry of ``results.json``. Returns ``(results by method, the table as text)``."""

    from allmap.app.build import build_model
    from allmap.app.runs import read_config

    protocol = protocol or SineProtocol()
    methods = sine_methods(run_dir, oracle)
    for other in others:
        methods += sine_methods(other)
    results: dict[str, Any] = {}
    for m in methods:
        name = m.name if m.name not in results else f"{m.name} ({sum(k.startswith(m.name) for k in results) + 1})"
        results[name] = evaluate_sine(m, protocol)
        if progress is not None:
            progress(
                f"{name}: MSE over all functions after the last {results[name]['mse_seen_held_out'][-1]['mean']:.3f}"
            )
    if scratch_runs:
        config = read_config(run_dir)

        def make(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return build_model(config)

        results["scratch (whole network online)"] = scratch_sine(make, protocol, scratch_runs)
    save_continual(
        run_dir,
        sine_figure(results, protocol),
        {"description": protocol.describe(), **asdict(protocol)},
        others,
        results,
    )
    return results, format_sine_table(results, protocol)

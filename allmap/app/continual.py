"""The continual meta-test of a lifelong representation (the OML code's ``evaluate_omniglot`` protocol).

For each number of classes ``N`` (10, 50, 100, 200, 600): ``N`` classes are drawn at random from the first
650 Omniglot evaluation characters; the first 15 drawings of each class, class after class in increasing
class order, form the training stream (one pass, one image per step); the last 5 are held out. Only a
fresh head learns (the representation is frozen), so every image's features are computed once. The head's
learning rate is chosen per ``N`` by a sweep: on each of ``sweep_runs`` streams every rate of ``lrs`` is run
and the one with the best **training-stream accuracy** kept; the most frequent winner is then used on
``runs`` new streams (the same streams for every method). Reported per method and ``N``, as mean ± 95% CI
over the runs: the **training-stream accuracy** (the stream's own images after the pass: memory) and the
**held-out accuracy** (the 5 other drawings of the same classes: generalisation), which published numbers
often mix; and Avalanche's forgetting and backward transfer on the held-out images over 10 experiences.

Methods: a head learned online (Adam, as the OML code) on the features of OML, ANML or an i.i.d.-pretrained
network; a streaming nearest-class-mean head (pretrained or ProtoNet features); an offline head trained on
the same examples in shuffled passes (the i.i.d. upper bound); the whole network trained from scratch on
the stream.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from allmap.engine.continual import (
    LinearHeads,
    continual_metrics,
    experience_ends,
    nearest_mean,
    nearest_mean_predict,
    offline_linear,
    online_linear,
)
from allmap.engine.evaluate import summarize

__all__ = [
    "ContinualProtocol",
    "Method",
    "representation",
    "features_of",
    "run_classes",
    "evaluate_method",
    "scratch_method",
    "format_table",
    "continual_figure",
    "DEFAULT_LRS",
]

DEFAULT_LRS = (0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001, 0.00003, 0.00001)  # the OML code's sweep
HEADS = ("online", "ncm", "offline")
#: floats of one chunk of heads (runs x classes x features): small enough to stay in cache
CHUNK_FLOATS = 2_000_000


@dataclass(frozen=True)
class ContinualProtocol:
    """The continual meta-test's settings; the defaults are the OML code's ``evaluate_omniglot``."""

    classes: tuple[int, ...] = (10, 50, 100, 200, 600)
    runs: int = 50
    sweep_runs: int = 5
    lrs: tuple[float, ...] = DEFAULT_LRS
    stream_drawings: int = 15
    pool: int = 650
    experiences: int = 10
    optimizer: str = "adam"
    oracle_epochs: int = 10
    oracle_lr: float = 0.01
    oracle_runs: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.classes or any(not isinstance(n, int) or not 1 <= n <= self.pool for n in self.classes):
            raise ValueError(
                f"ContinualProtocol: expected class counts between 1 and pool = {self.pool}, got {self.classes}."
            )
        if not 1 <= self.stream_drawings < 20:
            raise ValueError(f"ContinualProtocol: stream_drawings must be 1..19 of 20, got {self.stream_drawings}.")
        for name in ("runs", "sweep_runs", "experiences", "oracle_epochs", "oracle_runs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ContinualProtocol: expected {name} >= 1, got {getattr(self, name)!r}.")

    def describe(self) -> str:
        held = 20 - self.stream_drawings
        return (
            f"continual meta-test (OML's evaluate_omniglot): N classes from the first {self.pool} Omniglot "
            f"evaluation characters; training stream = first {self.stream_drawings} drawings per class in class "
            f"order, one pass, batch 1, fresh head, representation frozen; held-out = last {held}; head lr by a "
            f"sweep of {len(self.lrs)} rates ({self.optimizer}) on {self.sweep_runs} streams, chosen by "
            f"training-stream accuracy; {self.runs} runs per N (seed {self.seed}); mean ± 95% CI (1.96·std/sqrt(n))"
        )


@dataclass
class Method:
    """A row of the table: ``name``, the features ``[C, 20, F]`` of the evaluation characters, the head."""

    name: str
    features: Tensor
    head: str = "online"
    runs: int | None = None  # fewer runs than the protocol's (costly methods); None: the protocol's

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"Method {self.name!r}: expected head one of {', '.join(HEADS)}, got {self.head!r}.")


def representation(learner: nn.Module) -> Callable[[Tensor], Tensor]:
    """The frozen representation of a trained learner: OML/ANML's ``features``, else a model's ``body``,
    else the whole model (a metric learner's embedding)."""
    if callable(getattr(learner, "features", None)):
        embed = learner.features
    else:
        model = getattr(learner, "model", learner)
        embed = getattr(model, "body", model)
    device = next(learner.parameters()).device
    return lambda x: embed(x.to(device))  # inputs go to the learner's device (a GPU if the run has one)


@torch.no_grad()
def features_of(embed: Callable[[Tensor], Tensor], images: Tensor, chunk: int = 500) -> Tensor:
    """``embed`` of ``images [C, D, *x]`` in chunks, as ``[C, D, F]`` (float32, no autograd graph), on the
    images' device: the heads learn on the streams where they are built."""
    flat = images.flatten(0, 1)
    out = torch.cat([embed(flat[i : i + chunk]).flatten(1).to(images.device) for i in range(0, len(flat), chunk)])
    return out.view(images.shape[0], images.shape[1], -1).float()


def run_classes(protocol: ContinualProtocol, n: int, run: int, phase: str) -> Tensor:
    """The ``N`` classes (rows of the pool, increasing: the stream's order) of one run of one phase
    (``"sweep"`` or ``"test"``), fixed by the protocol's seed: every method sees the same streams."""
    salt = {"sweep": 1, "test": 2}[phase]
    g = torch.Generator().manual_seed(protocol.seed * 1_000_003 + salt * 10_007 + n * 101 + run)
    return torch.randperm(protocol.pool, generator=g)[:n].sort().values


def _streams(features: Tensor, rows: Tensor, drawings: range) -> tuple[Tensor, Tensor]:
    """``x [R, N*D, F]``, ``y [R, N*D]`` for the classes ``rows [R, N]``: class by class, labels 0..N-1."""
    x = features[rows][:, :, list(drawings)]  # [R, N, D, F]
    r, n, d = x.shape[:3]
    y = torch.arange(n).repeat_interleave(d).expand(r, -1)
    return x.reshape(r, n * d, -1), y.to(features.device)


def _per_class(pred: Tensor, classes: int) -> Tensor:
    """Accuracy per class ``[R, N]`` of predictions of class-ordered examples (the same count per class)."""
    truth = torch.arange(classes, device=pred.device).repeat_interleave(pred.shape[1] // classes)
    return (pred == truth).float().view(pred.shape[0], classes, -1).mean(-1)


def _chunk(classes: int, features: int) -> int:
    return max(1, CHUNK_FLOATS // (classes * features))


def _generator(protocol: ContinualProtocol, n: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(protocol.seed * 7_919 + n * 13 + index)


def _online_accuracies(
    method: Method, protocol: ContinualProtocol, rows: Tensor, lr: float | Tensor, g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Final per-class accuracies on the stream and held out ``[R, N]``, and held-out / stream ones after
    each experience ``[R, E, N]``, of online heads (or the head kind of ``method``)."""
    n, d = rows.shape[1], protocol.stream_drawings
    x, y = _streams(method.features, rows, range(d))
    xh, _ = _streams(method.features, rows, range(d, 20))
    ends = experience_ends(n, protocol.experiences)
    if method.head == "ncm":
        final, snaps = nearest_mean(x, y, n, [e * d for e in ends])
        predict: Callable[[Any, Tensor], Tensor] = lambda p, z: nearest_mean_predict(p, z)  # noqa: E731
    elif method.head == "offline":
        final = offline_linear(x, y, n, protocol.oracle_lr, g, protocol.oracle_epochs)
        snaps = [final] * len(ends)  # trained offline: no stream to follow (no forgetting by construction)
        predict = LinearHeads.predict
    else:
        final, snaps = online_linear(x, y, n, lr, g, protocol.optimizer, [e * d for e in ends])
        predict = LinearHeads.predict
    held = torch.stack([_per_class(predict(s, xh), n) for s in snaps], 1)
    stream = torch.stack([_per_class(predict(s, x), n) for s in snaps], 1)
    return _per_class(predict(final, x), n), _per_class(predict(final, xh), n), held, stream


def choose_lr(method: Method, protocol: ContinualProtocol, n: int) -> tuple[float, list[float]]:
    """The sweep: on each sweep stream, the rate of ``protocol.lrs`` with the best training-stream accuracy;
    returns the most frequent winner (ties: the larger rate) and the winners."""
    if method.head != "online":
        return math.nan, []
    winners = []
    lrs = torch.tensor(protocol.lrs, dtype=torch.float64)
    for s in range(protocol.sweep_runs):
        rows = run_classes(protocol, n, s, "sweep").expand(len(lrs), n)
        acc, _, _, _ = _online_accuracies(method, protocol, rows, lrs, _generator(protocol, n, 10_000 + s))
        winners.append(float(lrs[int(acc.mean(1).argmax())]))
    counts = Counter(winners)
    return max(counts, key=lambda lr: (counts[lr], lr)), winners


def evaluate_method(
    method: Method, protocol: ContinualProtocol, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The continual meta-test of one method: per ``N``, the chosen rate, the training-stream and held-out
    accuracies, forgetting and backward transfer (mean ± 95% CI over runs), and the average held-out
    accuracy against the number of classes seen (after each experience)."""
    out: dict[str, Any] = {"head": method.head, "by_classes": {}}
    runs = min(method.runs or protocol.runs, protocol.runs)
    for n in protocol.classes:
        lr, winners = choose_lr(method, protocol, n)
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        step = _chunk(n, method.features.shape[-1])
        for start in range(0, runs, step):
            rows = torch.stack([run_classes(protocol, n, r, "test") for r in range(start, min(start + step, runs))])
            parts.append(_online_accuracies(method, protocol, rows, lr, _generator(protocol, n, start)))
        accuracies = [torch.cat(p) for p in zip(*parts)]
        out["by_classes"][str(n)] = _record(accuracies, experience_ends(n, protocol.experiences), lr, winners)
        _report(progress, method.name, n, out["by_classes"][str(n)])
    return out


def _record(accuracies: Sequence[Tensor], ends: list[int], lr: float, winners: list[float]) -> dict[str, Any]:
    """One method at one ``N``: mean ± 95% CI over runs of the final accuracies ``[R, N]`` (stream, held out)
    and of the metrics of the accuracies after each experience ``[R, E, N]`` (held out, stream)."""
    stream, held, held_path, stream_path = accuracies
    m, ms = continual_metrics(held_path, ends), continual_metrics(stream_path, ends)
    return {
        "lr": lr,
        "sweep_winners": winners,
        "runs": stream.shape[0],
        "accuracy_stream": summarize(stream.mean(1)),
        "accuracy_held_out": summarize(held.mean(1)),
        "forgetting_held_out": summarize(m["forgetting"]),
        "backward_transfer_held_out": summarize(m["backward_transfer"]),
        "forgetting_stream": summarize(ms["forgetting"]),
        "classes_seen": ends,
        "curve_held_out": m["curve"].mean(0).tolist(),
        "curve_stream": ms["curve"].mean(0).tolist(),
    }


def _report(progress: Callable[[str], None] | None, name: str, n: int, r: dict[str, Any]) -> None:
    if progress is not None:
        lr = "" if math.isnan(r["lr"]) else f", lr {r['lr']:g}"
        progress(
            f"{name}, {n} classes: training-stream accuracy {100 * r['accuracy_stream']['mean']:.1f}%, held-out "
            f"{100 * r['accuracy_held_out']['mean']:.1f}% ({r['runs']} runs{lr})"
        )


@dataclass
class ScratchNet:
    """The whole network trained online from a fresh initialisation: ``make(seed)`` builds it."""

    make: Callable[[int], nn.Module]
    images: Tensor  # [C, 20, *x] evaluation characters
    lrs: tuple[float, ...] = (0.003, 0.001, 0.0003)
    runs: int = 5
    max_classes: int = 200  # longer streams are skipped: a network step per image


def _scratch_run(net: ScratchNet, protocol: ContinualProtocol, rows: Tensor, lr: float, seed: int) -> tuple:
    model = net.make(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    d, n = protocol.stream_drawings, len(rows)
    imgs = net.images[rows]
    x, xh = imgs[:, :d].flatten(0, 1), imgs[:, d:].flatten(0, 1)
    y = torch.arange(n).repeat_interleave(d)
    ends = set(e * d for e in experience_ends(n, protocol.experiences))
    held_path, stream_path = [], []

    @torch.no_grad()
    def per_class(z: Tensor) -> Tensor:
        return _per_class(torch.cat([model(z[i : i + 500])[:, :n] for i in range(0, len(z), 500)]).argmax(-1)[None], n)[
            0
        ]

    for t in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[t : t + 1]), y[t : t + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t + 1 in ends:
            held_path.append(per_class(xh))
            stream_path.append(per_class(x))
    return stream_path[-1], held_path[-1], torch.stack(held_path), torch.stack(stream_path)


def scratch_method(net: ScratchNet, protocol: ContinualProtocol, progress: Callable[[str], None] | None = None):
    """:func:`evaluate_method` for the whole network learned online from scratch (Adam, one pass, batch 1):
    the same protocol with ``net.runs`` runs and ``net.lrs`` swept on one stream (it costs a full network
    step per image)."""
    out: dict[str, Any] = {"head": "scratch", "by_classes": {}}
    for n in (n for n in protocol.classes if n <= net.max_classes):
        rows = run_classes(protocol, n, 0, "sweep")
        sweep = {lr: float(_scratch_run(net, protocol, rows, lr, 0)[0].mean()) for lr in net.lrs}
        lr = max(sweep, key=lambda k: (sweep[k], k))
        res = [_scratch_run(net, protocol, run_classes(protocol, n, r, "test"), lr, r + 1) for r in range(net.runs)]
        accuracies = [torch.stack(p) for p in zip(*res)]
        out["by_classes"][str(n)] = _record(accuracies, experience_ends(n, protocol.experiences), lr, [lr])
        _report(progress, "scratch", n, out["by_classes"][str(n)])
    return out


def _cell(r: dict[str, float]) -> str:
    return f"{100 * r['mean']:.1f}±{100 * r['ci95']:.1f}"


def format_table(results: dict[str, dict[str, Any]], protocol: ContinualProtocol) -> str:
    """Two tables (training-stream accuracy, held-out accuracy), methods by rows, ``N`` by columns, each cell
    ``mean±ci95`` in percent; then forgetting and backward transfer (held out) at the largest ``N``."""
    cols = [str(n) for n in protocol.classes]
    width = max(len(k) for k in results) + 2
    lines = [protocol.describe()]
    for key, title in (
        ("accuracy_stream", "TRAINING-STREAM accuracy (the stream's own images after one pass), %"),
        ("accuracy_held_out", "HELD-OUT accuracy (the other drawings of the same classes), %"),
    ):
        lines += ["", title, " " * width + "".join(f"{c + ' cl.':>14}" for c in cols)]
        for name, res in results.items():
            cells = [_cell(res["by_classes"][c][key]) if c in res["by_classes"] else "-" for c in cols]
            lines.append(f"{name:<{width}}" + "".join(f"{c:>14}" for c in cells))
    last = cols[-1]
    lines += [
        "",
        f"at {last} classes (held out, {protocol.experiences} experiences): forgetting, backward transfer, lr",
    ]
    for name, res in results.items():
        r = res["by_classes"].get(last)
        if r is not None:
            lr = "-" if math.isnan(r["lr"]) else f"{r['lr']:g}"
            lines.append(
                f"{name:<{width}}{_cell(r['forgetting_held_out']):>14}{_cell(r['backward_transfer_held_out']):>14}"
                f"{lr:>10}  ({r['runs']} runs)"
            )
    return "\n".join(lines)


def continual_figure(results: dict[str, dict[str, Any]], protocol: ContinualProtocol):
    """Three panels: training-stream and held-out accuracy against the number of classes (one line per
    method, 95% CI bars), and the average held-out accuracy over the classes seen during the longest stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    cols = [str(n) for n in protocol.classes]
    for name, res in results.items():
        got = [c for c in cols if c in res["by_classes"]]
        xs = [int(c) for c in got]
        for ax, key in zip(axes[:2], ("accuracy_stream", "accuracy_held_out")):
            mean = [100 * res["by_classes"][c][key]["mean"] for c in got]
            ci = [100 * res["by_classes"][c][key]["ci95"] for c in got]
            ax.errorbar(xs, mean, yerr=ci, marker="o", capsize=3, label=name)
        if got:
            r = res["by_classes"][got[-1]]
            axes[2].plot(r["classes_seen"], [100 * v for v in r["curve_held_out"]], marker=".", label=name)
    titles = (
        "training-stream accuracy (memory)",
        "held-out accuracy (generalisation)",
        f"held-out accuracy over classes seen ({cols[-1]}-class stream)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("classes seen" if ax is axes[2] else "classes learned (N)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xscale("log" if ax is not axes[2] else "linear")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Omniglot continual meta-test: one pass, one image per step; mean ± 95% CI over runs", fontsize=11)
    fig.tight_layout()
    return fig


def protocol_record(protocol: ContinualProtocol) -> dict[str, Any]:
    """The protocol as written to ``results.json``."""
    return {"description": protocol.describe(), **asdict(protocol)}


def method_label(config: dict[str, Any]) -> str:
    """How a run is named in the table: its learner (pretraining when it makes no online steps)."""
    learner = config["learner"]
    name = learner["name"]
    if name in ("oml", "anml") and learner.get("inner_steps", 15) == 0:
        return "pretrained (i.i.d.)"
    return {"oml": "OML", "anml": "ANML", "protonet": "ProtoNet"}.get(name, name)


def run_methods(run_dir: str, images: Tensor, oracle: bool = False, oracle_runs: int | None = None) -> list[Method]:
    """The rows of one run folder: an online head on a meta-learned representation; online and
    nearest-class-mean heads on a pretrained one; a nearest-class-mean head on a metric learner's
    embedding; with ``oracle``, also the offline head (the i.i.d. upper bound, on ``oracle_runs`` streams)."""
    from allmap.app.runs import load, read_config

    config = read_config(run_dir)
    label = method_label(config)
    learner = load(run_dir)  # on the run's device
    feats = features_of(representation(learner), images)
    if label == "ProtoNet":
        methods = [Method("ProtoNet + NCM head", feats, "ncm")]
    elif label in ("OML", "ANML"):
        methods = [Method(label, feats, "online")]
    else:
        methods = [Method(f"{label} + online head", feats, "online"), Method(f"{label} + NCM head", feats, "ncm")]
    if oracle:
        methods.append(Method(f"{label} + offline head (i.i.d. upper bound)", feats, "offline", runs=oracle_runs))
    return methods


def scratch_net(run_dir: str, images: Tensor, runs: int, max_classes: int = 200) -> ScratchNet:
    """The network of ``run_dir``'s config, freshly initialised for every run, learned whole from the stream."""
    from allmap.app.build import build_model
    from allmap.app.runs import read_config

    config = read_config(run_dir)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(config)

    return ScratchNet(make, images, runs=runs, max_classes=max_classes)


def continual_meta_test(
    run_dir: str,
    others: Sequence[str] = (),
    protocol: ContinualProtocol | None = None,
    oracle: bool = True,
    scratch_runs: int = 0,
    scratch_max_classes: int = 200,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """The continual meta-test of ``run_dir`` beside the runs ``others`` (baselines), written into
    ``run_dir``: ``continual.png`` and the ``continual`` entry of ``results.json``. Returns
    ``(results by method, the table as text)``."""
    from allmap.app.runs import read_config
    from allmap.tasks.streams import evaluation_order

    protocol = protocol or ContinualProtocol()
    root = read_config(run_dir)["task"].get("root")
    images = evaluation_order(root)
    methods = run_methods(run_dir, images, oracle, protocol.oracle_runs)
    for other in others:
        methods += run_methods(other, images)
    results: dict[str, Any] = {}
    for m in methods:
        name = m.name if m.name not in results else f"{m.name} ({sum(k.startswith(m.name) for k in results) + 1})"
        results[name] = evaluate_method(m, protocol, progress)
    if scratch_runs:
        net = scratch_net(run_dir, images, scratch_runs, scratch_max_classes)
        results["scratch (whole network online)"] = scratch_method(net, protocol, progress)
    save_continual(run_dir, continual_figure(results, protocol), protocol_record(protocol), others, results)
    return results, format_table(results, protocol)


def save_continual(
    run_dir: str, fig: Any, protocol: dict[str, Any], others: Sequence[str], results: dict[str, Any]
) -> None:
    """Write a continual meta-test into its run folder: the figure as ``continual.png`` and the
    ``continual`` entry of ``results.json`` (protocol, runs, figure, per-method results)."""
    import matplotlib.pyplot as plt

    from allmap.app.runs import RunDir

    run = RunDir(run_dir)
    figure = run.path / "continual.png"
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    record = json.loads(run.results.read_text()) if run.results.is_file() else {}
    record["continual"] = {
        "protocol": protocol,
        "runs": {"meta-test": str(run_dir), "baselines": [str(o) for o in others]},
        "figure": figure.name,
        "methods": results,
    }
    run.write_results(record)

"""Picture of few-shot image episodes: one row per class, named where the collection has names (an Omniglot
alphabet and character, an image folder's class), its K support images framed blue, then a few of its
queries framed green (predicted right) or red (wrong) with the predicted class under each. Used by
``plot_adaptation`` for :class:`~allmap.tasks.Episodes` families (Omniglot, image folders)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle
from torch import Tensor

from allmap.learners.base import Learner
from allmap.tasks.batch import TaskBatch

__all__ = ["plot_episode", "plot_episodes", "episodes_figure", "class_names"]

RIGHT, WRONG, SUPPORT = "#2ca02c", "#d62728", "#1f77b4"
NAME_WIDTH = 26  #: characters per line of a class name; longer names wrap onto a second line


def class_names(family, tasks: TaskBatch, i: int) -> list[str]:
    """Row labels of episode ``i``: ``"label: name"`` per class, with the collection's name of the class
    (e.g. ``"2: Latin/0012 (90°)"`` for a rotated Omniglot character), or its index in the collection
    where the collection has no names, or the episode label alone where the batch does not say."""
    ways = int(tasks.support_y[i].max()) + 1
    data, classes = getattr(family, "data", None), (tasks.info or {}).get("classes")
    if data is None or classes is None:
        return [str(k) for k in range(ways)]
    rotations = getattr(family, "rotations", (0,))
    out = []
    for k, c in enumerate(classes[i].tolist()[:ways]):
        base, r = c % data.classes, c // data.classes
        name = data.names[base].replace("_", " ") if data.names else f"class {base}"
        angle = rotations[r] % 360 if r < len(rotations) else 0
        out.append(textwrap.fill(f"{k}: {name}" + (f" ({angle}°)" if angle else ""), NAME_WIDTH))
    return out


def _predictions(learner: Learner, sx: Tensor, sy: Tensor, qx: Tensor, steps: Sequence[int]) -> Tensor:
    was_training = learner.training
    learner.eval()  # as in evaluation: BatchNorm with running statistics where the learner keeps them
    try:
        model = learner.adapt_path(sx, sy, [steps[-1]])[0]
        with torch.no_grad():
            return model(qx).argmax(-1).cpu()
    finally:
        learner.train(was_training)


def plot_episode(
    learner: Learner, family, tasks: TaskBatch, steps: Sequence[int], ax, i: int, queries_shown: int = 3
) -> None:
    """Draw episode ``i`` of ``tasks`` on ``ax``: row = class (labelled with :func:`class_names`), its K
    support images, then up to ``queries_shown`` of its queries, each framed green (right) or red (wrong)
    with the predicted class under it. The learner adapts with ``steps[-1]`` inner steps."""
    sx, sy, qx, qy = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i]
    pred = _predictions(learner, sx, sy, qx, steps)
    sx, sy, qx, qy = sx.cpu(), sy.cpu(), qx.cpu(), qy.cpu()
    ways = int(sy.max()) + 1
    shots = max(int((sy == k).sum()) for k in range(ways))
    c, h, w = sx.shape[1:]
    pad, label, gap = max(2, h // 10), max(4, h // 2), max(4, w // 2)  # label: room for the prediction
    row_h, cell_w = h + label, w + pad
    queries_left = pad + shots * cell_w + gap
    canvas = torch.ones(c, ways * row_h + pad, queries_left + queries_shown * cell_w)
    frames, texts = [], []
    for k in range(ways):
        top = pad + k * row_h
        cells = [(sx[j], pad + n * cell_w, SUPPORT, None) for n, j in enumerate(torch.nonzero(sy == k).flatten())]
        for n, j in enumerate(torch.nonzero(qy == k).flatten()[:queries_shown].tolist()):
            p = int(pred[j])
            cells.append((qx[j], queries_left + n * cell_w, RIGHT if p == k else WRONG, p))
        for img, left, colour, p in cells:
            # one channel: ink 1.0 on paper 0.0, drawn as dark strokes on white
            canvas[:, top : top + h, left : left + w] = 1.0 - img if c == 1 else img
            frames.append((left, top, colour))
            if p is not None:
                texts.append((left + w / 2, top + h + label / 2, str(p), colour))
    image = canvas[0] if c == 1 else canvas.permute(1, 2, 0)
    ax.imshow(image.clamp(0, 1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    for left, top, colour in frames:
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), w, h, fill=False, ec=colour, lw=1.2))
    for x, y, text, colour in texts:
        ax.text(x, y, text, ha="center", va="center", fontsize=7, color=colour, fontweight="bold")
    ax.set_yticks([pad + k * row_h + h / 2 for k in range(ways)], class_names(family, tasks, i), fontsize=8)
    ax.set_xticks(
        [pad + shots * cell_w / 2, queries_left + queries_shown * cell_w / 2], ["support", "queries"], fontsize=8
    )
    ax.xaxis.set_ticks_position("top")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    acc = float((pred == qy).float().mean())
    after = f" after {steps[-1]} step{'s' * (steps[-1] != 1)}" if learner.spec.adapts_in_steps else ""
    ax.set_title(
        f"episode {i}: {ways}-way {shots}-shot, {100 * acc:.0f}% of {len(qy)} queries right{after}", fontsize=9
    )


def episodes_figure(
    learner: Learner, family, tasks: TaskBatch, steps: Sequence[int], n: int = 4, queries_shown: int = 3
):
    """The first ``n`` episodes of ``tasks`` (:func:`plot_episode`) in a grid of up to two columns, sized so
    that every image and label can be read (images smaller for many classes)."""
    n = min(n, len(tasks))
    ways = int(tasks.support_y[0].max()) + 1
    shots = max(int((tasks.support_y[0] == k).sum()) for k in range(ways))
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    cell = min(0.45, 9.0 / (rows * ways))  # inches per image: a figure at most about 9 in of images tall
    names = [line for i in range(n) for label in class_names(family, tasks, i) for line in label.splitlines()]
    name_in = 0.3 + 0.075 * max(len(line) for line in names)  # about 0.075 in per character at 8 pt
    title_in = 4.0  # room for an episode's title
    width = cols * max(name_in + (shots + queries_shown + 0.7) * cell * 1.1, title_in)
    height = rows * (0.6 + ways * cell * 1.5) + 0.5
    fig = plt.figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for i, ax in enumerate(axes):
        if i < n:
            plot_episode(learner, family, tasks, steps, ax, i, queries_shown)
        else:
            ax.axis("off")
    fig.suptitle(
        f"{type(learner).__name__} on {type(family).__name__} test episodes: support framed blue, queries "
        f"green (right) or red (wrong), predicted class below",
        fontsize=10,
    )
    return fig


def plot_episodes(
    learner: Learner,
    family,
    tasks: TaskBatch,
    path: str | Path,
    steps: Sequence[int],
    n: int = 4,
    queries_shown: int = 3,
) -> None:
    """:func:`episodes_figure` saved as a PNG at ``path``."""
    fig = episodes_figure(learner, family, tasks, steps, n, queries_shown)
    fig.savefig(path, dpi=120)
    plt.close(fig)

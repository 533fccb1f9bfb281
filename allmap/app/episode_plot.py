"""Picture of a few-shot image episode: support images on top, queries below, each query framed green
(right) or red (wrong) with its predicted and true labels. Used by ``plot_adaptation`` for
:class:`~allmap.tasks.Episodes` families (Omniglot, image folders)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.patches import Rectangle

from allmap.learners.base import Learner
from allmap.tasks.batch import TaskBatch

__all__ = ["plot_episode"]


def plot_episode(learner: Learner, family, tasks: TaskBatch, steps: Sequence[int], ax, i: int,
                 queries_shown: int = 3) -> None:
    """Draw episode ``i`` of ``tasks`` on ``ax``: column = class, row 0 = one support image per class,
    rows below = up to ``queries_shown`` queries of that class, labelled ``predicted/true``."""
    sx, sy, qx, qy = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i]
    was_training = learner.training
    learner.eval()  # as in evaluation: BatchNorm with running statistics where the learner keeps them
    model = learner.adapt_path(sx, sy, [steps[-1]])[0]
    with torch.no_grad():
        pred = model(qx).argmax(-1).cpu()
    learner.train(was_training)
    sx, sy, qx, qy = sx.cpu(), sy.cpu(), qx.cpu(), qy.cpu()
    ways = int(sy.max()) + 1
    c, h, w = sx.shape[1:]
    pad = max(2, h // 8)
    rows = 1 + queries_shown
    canvas = torch.ones(c, rows * (h + pad) + pad, ways * (w + pad) + pad)
    cells = []
    for k in range(ways):
        shown = [(sx[int(torch.nonzero(sy == k)[0])], None, None)]
        for j in torch.nonzero(qy == k).flatten()[:queries_shown].tolist():
            shown.append((qx[j], int(pred[j]), k))
        for r, (img, p, t) in enumerate(shown):
            top, left = pad + r * (h + pad), pad + k * (w + pad)
            # one channel: ink 1.0 on paper 0.0, drawn as dark strokes on white
            canvas[:, top : top + h, left : left + w] = 1.0 - img if c == 1 else img
            cells.append((top, left, p, t))
    image = canvas[0] if c == 1 else canvas.permute(1, 2, 0)
    ax.imshow(image.clamp(0, 1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    for top, left, p, t in cells:
        if p is None:
            ax.add_patch(Rectangle((left - 1, top - 1), w + 1, h + 1, fill=False, ec="#1f77b4", lw=1.5))
            continue
        colour = "#2ca02c" if p == t else "#d62728"
        ax.add_patch(Rectangle((left - 1, top - 1), w + 1, h + 1, fill=False, ec=colour, lw=1.5))
        if ways <= 10:
            ax.text(left + w / 2, top + h + pad * 0.45, f"{p}/{t}", ha="center", va="center", fontsize=5, color=colour)
    acc = float((pred == qy).float().mean())
    ax.set_title(f"episode {i}: {ways}-way {len(sy) // ways}-shot, accuracy {100 * acc:.0f}%\n"
                 "top row: support (blue); below: queries, predicted/true", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])

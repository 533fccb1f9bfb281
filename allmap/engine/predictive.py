"""Predictive distributions as an output: the Gaussian negative log-likelihood loss and the metrics of a
predictive distribution (log-likelihood per point, MSE of its mean, coverage of its central 95% interval).

A learner's task model is *predictive* when it predicts ``[mean, std]`` concatenated along the last
dimension (``pred [N, 2 * y_dim]``, ``std > 0``), the output of neural processes (Garnelo et al. 2018) and
of any network trained with :func:`gaussian_nll`. A task model may also offer ``distribution(x)``: a mixture
of ``S`` equally weighted Gaussians ``(mean [S, N, *y], std [S, N, *y])``, e.g. ``S`` latent samples of an
ANP (Kim et al. 2019); one Gaussian otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "gaussian_nll",
    "split_gaussian",
    "mixture_metrics",
    "PREDICTIVE_METRICS",
    "distribution_of",
    "oracle_per_task",
]

#: the metrics of a predictive distribution that evaluation reports, in order
PREDICTIVE_METRICS = ("target_loglik", "context_loglik", "mse", "coverage95")

_LOG_2PI = math.log(2 * math.pi)


def split_gaussian(pred: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` of a predictive output ``[..., 2 * y_dim]`` (mean first, then std)."""
    if pred.shape[-1] % 2:
        raise ValueError(
            f"gaussian_nll: expected predictions [..., 2 * y_dim] (mean, then std), got last dimension "
            f"{pred.shape[-1]}. Give the model twice as many outputs as the target has dimensions."
        )
    return pred.chunk(2, dim=-1)


def _log_normal(y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return -0.5 * ((y - mean) / std).pow(2) - std.log() - 0.5 * _LOG_2PI


def gaussian_nll(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over points of ``-log N(target; mean, diag(std^2))`` with ``pred = [mean, std]`` (summed over
    the target's dimensions, as ``MultivariateNormalDiag.log_prob`` in the neural-processes notebooks)."""
    mean, std = split_gaussian(pred)
    return -_log_normal(target, mean, std).sum(-1).mean()


def distribution_of(model: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """The predictive mixture ``(mean [S, N, *y], std [S, N, *y])`` of a task model at ``x``."""
    mixture = getattr(model, "distribution", None)
    if mixture is not None:
        return mixture(x)
    mean, std = split_gaussian(model(x))
    return mean[None], std[None]


def mixture_metrics(mean: Tensor, std: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-likelihood per point, MSE and 95% coverage of targets ``y [N, *y]`` under the equally weighted
    mixture of Gaussians ``N(mean[s], diag(std[s]^2))``, ``mean, std [S, N, *y]``.

    - log-likelihood per point: ``mean_i log((1/S) sum_s prod_d N(y_id; mean_sid, std_sid^2))``;
    - MSE: of the mixture's mean ``(1/S) sum_s mean_s``, over points and dimensions;
    - coverage: the fraction of ``y_id`` inside the mixture's central 95% interval, i.e. with the mixture's
      CDF ``F(y) = (1/S) sum_s Phi((y - mean_s) / std_s)`` in ``[0.025, 0.975]`` (exact for any ``S``).
    """
    logp = _log_normal(y, mean, std).flatten(2).sum(-1)  # [S, N]
    loglik = (torch.logsumexp(logp, 0) - math.log(mean.shape[0])).mean()
    mse = (mean.mean(0) - y).pow(2).mean()
    cdf = torch.special.ndtr((y - mean) / std).mean(0)
    coverage = ((cdf >= 0.025) & (cdf <= 0.975)).to(mean.dtype).mean()
    return loglik, mse, coverage


def oracle_per_task(family, tasks) -> dict[str, Tensor]:
    """The metrics of ``family.oracle`` (an exact posterior predictive ``(mean, std)``, e.g.
    :meth:`allmap.tasks.GPRegression.oracle`) on ``tasks`` (a batch or a list of batches), task by task:
    ``{"oracle_target_loglik": Tensor [tasks], ...}`` with the names of :data:`PREDICTIVE_METRICS`."""
    rows = []
    for batch in [tasks] if hasattr(tasks, "support_x") else tasks:
        sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
        target = family.oracle(sx, sy, qx, batch.info)
        context = family.oracle(sx, sy, sx, batch.info)
        for i in range(len(batch)):
            t_ll, mse, cover = mixture_metrics(target[0][i : i + 1], target[1][i : i + 1], qy[i].double())
            c_ll = mixture_metrics(context[0][i : i + 1], context[1][i : i + 1], sy[i].double())[0]
            rows.append(torch.stack([t_ll, c_ll, mse, cover]))
    values = torch.stack(rows)
    return {f"oracle_{name}": values[:, j] for j, name in enumerate(PREDICTIVE_METRICS)}

"""The inner update of a gradient-based learner: the part :class:`~allmap.learners.gradient.GradientLearner`
takes to turn the support loss's gradient into a step.

Each update is an ``nn.Module`` (so an update with meta-parameters, such as learned rates or an LSTM, is
meta-trained with the rest of the learner) that builds a pure inner optimizer
(:class:`allmap.inner.InnerOptimizer`) for the parameters that adapt.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from allmap.checks import check_int
from allmap.hypergrad import STRATEGIES
from allmap.inner.optim import InnerOptimizer, Params, adam, sgd

__all__ = [
    "InnerUpdate",
    "SGD",
    "Adam",
    "LearnedRates",
    "LSTMUpdate",
    "descent",
    "param_key",
    "step_size",
    "preprocess",
]


class InnerUpdate(nn.Module):
    """How a gradient-based learner steps: ``theta_{t+1} = theta_t + update(grad L_support(theta_t))``.

    Subclasses implement :meth:`optimizer`; :meth:`setup` is called once with the parameters that adapt.
    :meth:`accepts` names the meta-gradient strategies that apply: an update with meta-parameters of its own
    cannot be trained by the implicit gradient (which depends on the inner problem's solution, not on the path
    to it), and one that writes its own steps (the LSTM) is not an optimizer step that truncation,
    checkpointing or an implicit solve can take apart.
    """

    def setup(self, params: Params) -> None:
        """Prepare for these adapted parameters (name -> tensor); called once by the learner."""

    def optimizer(self) -> InnerOptimizer:
        raise NotImplementedError

    def accepts(self) -> tuple[str, ...]:
        """The meta-gradient strategies that apply to this update (every registered one by default)."""
        return tuple(STRATEGIES)


class SGD(InnerUpdate):
    """Gradient descent with a fixed step size: ``theta' = theta - lr * g`` (MAML, Finn et al. 2017)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = float(lr)

    def optimizer(self) -> InnerOptimizer:
        return sgd(self.lr)

    def extra_repr(self) -> str:
        return f"lr={self.lr}"


class Adam(InnerUpdate):
    """Adam inner steps (Kingma & Ba 2015), differentiable; ``betas=(0, 0.999)`` is Reptile's inner Adam."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        super().__init__()
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))

    def optimizer(self) -> InnerOptimizer:
        return adam(self.lr, betas=self.betas)

    def extra_repr(self) -> str:
        return f"lr={self.lr}, betas={self.betas}"


def step_size(owner: str, inner_lr: Any) -> float:
    """``inner_lr`` as a finite number >= 0, or a clear error naming ``owner``'s option."""
    try:
        rate = float(inner_lr)
    except (TypeError, ValueError, RuntimeError):
        rate = float("nan")
    if isinstance(inner_lr, bool) or not math.isfinite(rate) or rate < 0:
        raise ValueError(
            f"{owner}: inner_lr must be a finite number >= 0 (the inner step size; 0 keeps theta), got "
            f"{inner_lr!r}. A negative step climbs the support loss instead of lowering it."
        )
    return rate


def descent(owner: str, name: str, inner_lr: Any, betas: tuple[float, float] = (0.9, 0.999)) -> InnerUpdate:
    """The update named by ``owner``'s ``inner_optimizer`` argument, ``"sgd"`` or ``"adam"``, with step
    size ``inner_lr`` (checked by :func:`step_size`)."""
    if name not in ("sgd", "adam"):
        raise ValueError(f"{owner}: unknown inner_optimizer {name!r}; expected one of sgd, adam.")
    lr = step_size(owner, inner_lr)
    return SGD(lr) if name == "sgd" else Adam(lr, betas)


def param_key(name: str) -> str:
    """``name`` as a module attribute or ParameterDict key: dots become ``__``."""
    # ParameterDict keys may not contain "."; "__" cannot clash with a module attribute name.
    return name.replace(".", "__")


class LearnedRates(InnerUpdate):
    """One learned step size per parameter entry: ``theta' = theta - alpha * g`` (elementwise), with
    ``alpha`` meta-trained with theta (Meta-SGD, Li et al. 2017). ``lr`` initialises every entry."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = float(lr)
        self.rates = nn.ParameterDict()

    def setup(self, params: Params) -> None:
        for n, p in params.items():
            self.rates[param_key(n)] = nn.Parameter(torch.full_like(p.detach(), self.lr))
        self._names = list(params)

    def optimizer(self) -> InnerOptimizer:
        return sgd({n: self.rates[param_key(n)] for n in self._names})

    def accepts(self) -> tuple[str, ...]:
        return tuple(s for s in STRATEGIES if s != "implicit")

    def __getitem__(self, name: str) -> nn.Parameter:
        """The rates of parameter ``name`` (e.g. ``"weight"`` or ``"head.bias"``)."""
        return self.rates[param_key(name)]


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """``[..., 2]`` features of ``x``: ``(log|x|/p, sign x)`` for ``|x| >= e^-p``, else ``(-1, e^p x)``.

    Andrychowicz et al. 2016, appendix A. ``log`` sees ``max(|x|, e^-p)`` so its derivative stays finite in the
    branch ``torch.where`` drops.
    """
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, torch.log(x.abs().clamp_min(math.exp(-p))) / p, -torch.ones_like(x))
    second = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([first, second], dim=-1)


class LSTMUpdate(InnerUpdate):
    """Ravi & Larochelle's meta-learner LSTM, applied to every parameter coordinate (ICLR 2017).

    Update rule, coordinate-wise over the flattened parameters ``theta`` with gradient ``g`` and loss ``L``:
    ``[h_t, c_t] = LSTM([pre(g), pre(L)], [h_{t-1}, c_{t-1}])``, the input gate
    ``i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)``, the forget gate
    ``f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)`` and ``theta_t = f_t * theta_{t-1} - i_t * g``
    (``pre``: :func:`preprocess`). ``b_I`` starts at ``logit(inner_lr)`` so ``i_t ~ inner_lr``; ``b_F`` at
    ``forget_bias`` (large: ``f_t ~ 1``, no decay at the start; the paper uses 4 to 6).
    """

    def __init__(self, hidden: int = 20, inner_lr: float = 0.01, forget_bias: float = 5.0) -> None:
        super().__init__()
        if not 0 < inner_lr < 1:
            raise ValueError(f"LSTMMetaLearner: expected 0 < inner_lr < 1 (the initial input gate), got {inner_lr}.")
        check_int("LSTMMetaLearner", "hidden", hidden)
        self.hidden, self.lr, self.forget_bias = hidden, float(inner_lr), float(forget_bias)

    def setup(self, params: Params) -> None:
        ref = next(iter(params.values()), torch.empty(0))
        like = {"dtype": ref.dtype, "device": ref.device}
        h = self.hidden
        self.lstm = nn.Linear(4 + h, 4 * h, **like)  # the coordinate-wise LSTM layer: [x, h] -> gates
        self.input_gate = nn.Linear(h + 2, 1, **like)
        self.forget_gate = nn.Linear(h + 2, 1, **like)
        with torch.no_grad():
            logit = math.log(self.lr / (1 - self.lr))
            for gate, bias in ((self.input_gate, logit), (self.forget_gate, self.forget_bias)):
                gate.weight.uniform_(-0.01, 0.01)
                gate.bias.fill_(bias)

    def _cell(self, h: Tensor, c: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        gates = self.lstm(torch.cat([x, h], dim=-1))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def optimizer(self) -> InnerOptimizer:
        def init(params: Params) -> tuple[Tensor, ...]:
            ref = next(iter(params.values()))
            n = sum(p.numel() for p in params.values())
            hidden = ref.new_zeros(n, self.hidden)
            gate = ref.new_zeros(n, 1)
            return hidden, hidden, gate, gate  # h, c, i, f

        def update(grads: Params, state: tuple, params: Params, value: Tensor) -> tuple[Params, tuple]:
            names = list(params)
            theta = torch.cat([params[k].reshape(-1) for k in names])
            grad = torch.cat([grads[k].reshape(-1) for k in names])
            h, c, i_gate, f_gate = state
            n = theta.shape[0]
            x = torch.cat([preprocess(grad), preprocess(value).expand(n, 2)], dim=-1)
            h, c = self._cell(h, c, x)
            prev = theta.unsqueeze(-1)
            i_gate = torch.sigmoid(self.input_gate(torch.cat([h, prev, i_gate], dim=-1)))
            f_gate = torch.sigmoid(self.forget_gate(torch.cat([h, prev, f_gate], dim=-1)))
            step = (f_gate.squeeze(-1) - 1) * theta - i_gate.squeeze(-1) * grad  # theta_t - theta_{t-1}
            sizes = [params[k].numel() for k in names]
            updates = {k: u.view(params[k].shape) for k, u in zip(names, step.split(sizes))}
            return updates, (h, c, i_gate, f_gate)

        return InnerOptimizer(init, update, uses_loss=True)

    def accepts(self) -> tuple[str, ...]:
        return ("unrolled", "first_order", "forward", "finite_difference")

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}"

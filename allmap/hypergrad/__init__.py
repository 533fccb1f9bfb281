"""How the meta-gradient crosses adaptation, one small module per strategy, selectable by name.

====================  ==========================================================================
``unrolled``          reverse mode through every inner step (exact; memory grows with the steps)
``first_order``       inner gradients are constants (FOMAML)
``truncated(k)``      reverse mode through the last ``k`` steps only
``checkpointed``      exact reverse mode, each step recomputed in the backward pass (flat memory)
``implicit``          iMAML: implicit function theorem on a proximal inner problem, CG or Neumann
``forward``           forward mode (``jvp``) of the whole meta-loss, one pass per meta-parameter
``finite_difference`` central differences or an antithetic zeroth-order estimate with its variance
====================  ==========================================================================

Where they apply: MAML and ANIL take every strategy; Meta-SGD all but ``implicit`` (its learned rates would
get no gradient); :class:`~allmap.IMAML` is ``implicit``; :class:`~allmap.Reptile` has its own first-order
direction and takes none; :class:`~allmap.LSTMMetaLearner` takes ``unrolled``, ``first_order``, ``forward``
and ``finite_difference``. ``checkpointed`` and ``implicit`` have custom backward passes, so meta-training
runs their tasks one at a time (IMAML meta-trains through a vmappable surrogate instead).

Learners take ``hypergrad="truncated(5)"`` (a name, a call with literal arguments, a mapping with a
``name`` key as in config files, or a :class:`Strategy` object); :func:`resolve` does the parsing.
"""

from allmap.hypergrad.base import (
    STRATEGIES,
    InnerStrategy,
    Strategy,
    WholeLossStrategy,
    check_strategy,
    meta_loss_surrogate,
    register,
    resolve,
)
from allmap.hypergrad.basic import FirstOrder, Unrolled, stop_gradient
from allmap.hypergrad.checkpointed import Checkpointed
from allmap.hypergrad.finite_difference import (
    FiniteDifference,
    central_differences,
    directional_difference,
    zeroth_order,
)
from allmap.hypergrad.forward import Forward, hypergradient
from allmap.hypergrad.implicit import Implicit, ImplicitSolveError, ImplicitSolveWarning, conjugate_gradient, neumann
from allmap.hypergrad.truncated import Truncated

__all__ = [
    "STRATEGIES",
    "Strategy",
    "InnerStrategy",
    "WholeLossStrategy",
    "check_strategy",
    "register",
    "resolve",
    "meta_loss_surrogate",
    "stop_gradient",
    "Unrolled",
    "FirstOrder",
    "Truncated",
    "Checkpointed",
    "Implicit",
    "ImplicitSolveError",
    "ImplicitSolveWarning",
    "conjugate_gradient",
    "neumann",
    "Forward",
    "hypergradient",
    "FiniteDifference",
    "central_differences",
    "zeroth_order",
    "directional_difference",
]

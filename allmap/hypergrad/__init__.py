"""How the meta-gradient crosses adaptation.

``unrolled``: reverse mode through every inner step (second order, exact).
``first_order``: the inner gradients are treated as constants (a stop-gradient), as in first-order MAML
(Finn et al. 2017, section 5.2); the meta-gradient is then the query gradient at the adapted parameters.
"""

from allmap.hypergrad.basic import STRATEGIES, check_strategy, stop_gradient

__all__ = ["STRATEGIES", "check_strategy", "stop_gradient"]

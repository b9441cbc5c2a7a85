"""Learning-rate ceilings predicted from curvature.

Gradient descent on a quadratic with Hessian H is stable iff ``η < 2/λ_max(H)`` (each eigen-
direction contracts by ``|1 − ηλ|``); near a minimum the same holds for the local quadratic model.
A direction of curvature μ then needs about ``1/(η μ) ≥ λ_max/(2μ)`` steps. SpecDef leaves the
curvature of the *untouched* parameters exactly unchanged (``docs/theory.md``) while raising
λ_max, so for the directions an attacker cares about, GD at its largest stable rate needs
``λ_max(defended)/λ_max(undefended)`` times as many steps: the predicted slowdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_ceiling(lambda_max: float) -> float:
    """``2/λ_max``: the largest stable gradient-descent learning rate (inf when λ_max ≤ 0)."""
    return 2.0 / lambda_max if lambda_max > 0 else math.inf


@dataclass(frozen=True)
class Slowdown:
    """Predicted GD cost of a defended model relative to the undefended one."""

    lambda_undefended: float
    lambda_defended: float
    lr_undefended: float
    lr_defended: float
    factor: float  # steps(defended) / steps(undefended) for directions of unchanged curvature


def predicted_slowdown(lambda_undefended: float, lambda_defended: float) -> Slowdown:
    """Ceilings ``2/λ_max`` for both models and the step-count factor ``λ_def/λ_undef``."""
    lr_u, lr_d = lr_ceiling(lambda_undefended), lr_ceiling(lambda_defended)
    factor = lambda_defended / lambda_undefended if lambda_undefended > 0 else math.nan
    return Slowdown(lambda_undefended, lambda_defended, lr_u, lr_d, factor)

"""Curvature of the training loss: Hessian-vector products, the Hessian as a linear operator,
eigenvalue / singular-value / trace estimators, certified lower bounds on σ₁(H), and learning-rate
ceilings. Pure math: imports nothing from the rest of specdef except :mod:`specdef.errors`; the
SpecDef-aware wrappers (which find the defended pairs) live in :mod:`specdef.defense.certify`.
"""

from specdef.curvature.certificates import (
    Certificate,
    SpectralBound,
    compensation_directions,
    pair_spectral_bound,
    rayleigh_certificate,
)
from specdef.curvature.estimators import (
    EigenResult,
    MatrixOperator,
    SigmaResult,
    TraceResult,
    arpack_eigsh,
    block_sigma_max,
    dense_hessian,
    hutchinson_trace,
    lanczos,
    power_iteration,
)
from specdef.curvature.hvp import (
    HessianOperator,
    double_backward_safe,
    hessian_vector_product,
    select_parameters,
)
from specdef.curvature.lr import Slowdown, lr_ceiling, predicted_slowdown

__all__ = [
    "Certificate",
    "EigenResult",
    "HessianOperator",
    "MatrixOperator",
    "SigmaResult",
    "Slowdown",
    "SpectralBound",
    "TraceResult",
    "arpack_eigsh",
    "block_sigma_max",
    "compensation_directions",
    "dense_hessian",
    "double_backward_safe",
    "hessian_vector_product",
    "hutchinson_trace",
    "lanczos",
    "lr_ceiling",
    "pair_spectral_bound",
    "power_iteration",
    "predicted_slowdown",
    "rayleigh_certificate",
    "select_parameters",
]

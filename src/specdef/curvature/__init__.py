"""Curvature of the training loss, pure math: Hessian-vector products and operator (hvp), eigen /
trace estimators (estimators), certified σ₁ bounds (certificates), learning-rate ceilings (lr).
Re-exports their public names as a facade (``from specdef.curvature import lanczos``).
"""

from specdef.curvature.certificates import (
    Certificate,
    ProductBound,
    SpectralBound,
    compensation_directions,
    linear_chain_cross_block,
    pair_spectral_bound,
    product_bound,
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
    "ProductBound",
    "EigenResult",
    "HessianOperator",
    "MatrixOperator",
    "SigmaResult",
    "Slowdown",
    "SpectralBound",
    "linear_chain_cross_block",
    "product_bound",
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

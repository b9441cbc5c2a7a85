"""Regenerate the tightness table of docs/theory.md §9: the paper's Theorem-3-form bound
(singular values × principal-angle cosines) on a defended deep linear network at zero residual,
beside the diagonal (quadratic) block and the exact σ₁(H) of a dense float64 Hessian.

    PYTHONPATH=src python scripts/paper_bound_table.py          # a few seconds

Network: x (8) → A₁ (6×8) → W̃ (6×6, top-2 inflated by α) → C (6×6) → A₄ (4×6), 64 Gaussian
inputs, seed 0; loss ½·mean‖f(x) − y‖² with y = f(x). Calls only public functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from specdef.curvature import dense_hessian, linear_chain_cross_block, product_bound
from specdef.linalg.spectral import spectral_deform

ALPHAS = (1.0, 10.0, 1e2, 1e3, 1e4)
F64 = torch.float64


def _sigma(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def render() -> str:
    gen = torch.Generator().manual_seed(0)
    a1, w, a4 = (torch.randn(s, generator=gen, dtype=F64) for s in ((6, 8), (6, 6), (4, 6)))
    x = torch.randn(64, 8, generator=gen, dtype=F64)
    lines = [
        "| α | paper-form bound | σ₁(H[C, A₁]) | σ₁(H[C, C]) | σ₁(H) dense | paper / σ₁(H) | "
        "σ₁(H[C, C]) / σ₁(H) |",
        "|---|---|---|---|---|---|---|",
    ]
    for alpha in ALPHAS:
        if alpha == 1.0:  # the identity slot: W̃ = W, C = I
            inflated, compensation = w, torch.eye(6, dtype=F64)
        else:
            inflated, compensation = spectral_deform(w, alpha, 2)
        weights = [a1, inflated, compensation, a4]
        # the block between C (layer 2) and A₁ (layer 0): K_in = W̃·(A₁Σ), K_out = A₄ᵀA₄·W
        k_in, k_out = linear_chain_cross_block(weights, x, first=0, second=2)
        sigma_x = x.T @ x / x.shape[0]
        paper = product_bound(None, inflated, a1 @ sigma_x).paper * _sigma(k_out)
        cross = _sigma(k_in) * _sigma(k_out)
        d_in, d_out = linear_chain_cross_block(weights, x, first=2, second=2)
        diagonal = _sigma(d_in) * _sigma(d_out)
        model = nn.Sequential(*(nn.Linear(m.shape[1], m.shape[0], bias=False) for m in weights))
        with torch.no_grad():
            for layer, m in zip(model, weights, strict=True):
                layer.weight.copy_(m)
        model.double()
        with torch.no_grad():
            y = model(x)

        def loss(net: nn.Module, batch: Any) -> torch.Tensor:
            return 0.5 * ((net(batch[0]) - batch[1]) ** 2).sum(1).mean()

        exact = _sigma(dense_hessian(model, loss, [(x, y)]))
        lines.append(
            f"| {alpha:g} | {paper:.4g} | {cross:.4g} | {diagonal:.4g} | {exact:.4g} | "
            f"{paper / exact:.3g} | {diagonal / exact:.3g} |"
        )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    print(render())


if __name__ == "__main__":
    main()

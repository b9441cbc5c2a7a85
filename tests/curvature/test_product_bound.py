"""The paper's Theorem-3-form bound (singular values × principal-angle cosines) against SVDs and a
dense float64 Hessian of a deep linear network."""

from __future__ import annotations

import torch

from specdef.curvature.certificates import linear_chain_cross_block, product_bound

F64 = torch.float64


def test_rayleigh_form_never_exceeds_the_exact_sigma() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b, c = (torch.randn(s, generator=gen, dtype=F64) for s in ((3, 5), (5, 4), (4, 6)))
        bound = product_bound(a, b, c)
        assert bound.rayleigh <= bound.exact * (1 + 1e-12)


def test_paper_form_is_not_a_bound_when_other_singular_pairs_cancel() -> None:
    # M = diag(1, −1) has two top pairs; ℓᵀ M ρ = 0 for ℓ = ρ = (1, 1)/√2, so L·M·R = 0 while
    # σ₁(M)·cos θ₁·cos θ₂ = 1/2
    v = torch.tensor([[1.0, 1.0]], dtype=F64) / 2**0.5
    bound = product_bound(v, torch.diag(torch.tensor([1.0, -1.0], dtype=F64)), v.T)
    assert bound.exact < 1e-15 and abs(bound.paper - 0.5) < 1e-12 and bound.rayleigh < 1e-15


def test_paper_form_is_exact_for_a_rank_one_middle() -> None:
    gen = torch.Generator().manual_seed(1)
    u, w = torch.randn(5, 1, generator=gen, dtype=F64), torch.randn(1, 4, generator=gen, dtype=F64)
    a, c = torch.randn(3, 5, generator=gen, dtype=F64), torch.randn(4, 6, generator=gen, dtype=F64)
    bound = product_bound(a, u @ w, c)
    assert abs(bound.paper - bound.rayleigh) < 1e-12 * bound.exact
    assert bound.paper <= bound.exact * (1 + 1e-12)


def _chain_hessian(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    shapes = [w.shape for w in weights]

    def f(theta: torch.Tensor) -> torch.Tensor:
        out, offset = x.T, 0
        for shape in shapes:
            n = shape[0] * shape[1]
            out = theta[offset : offset + n].view(shape) @ out
            offset += n
        return out

    theta = torch.cat([w.flatten() for w in weights])
    y = f(theta).detach()  # zero residual: H is the Gauss-Newton matrix
    return torch.autograd.functional.hessian(lambda t: 0.5 * ((f(t) - y) ** 2).sum(0).mean(), theta)


def test_linear_chain_blocks_match_a_dense_hessian() -> None:
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(s, generator=gen, dtype=F64) for s in ((4, 5), (4, 4), (4, 4), (3, 4))]
    x = torch.randn(50, 5, generator=gen, dtype=F64)
    hessian = _chain_hessian(weights, x)
    offsets = [0]
    for w in weights:
        offsets.append(offsets[-1] + w.numel())
    for i, j in [(0, 2), (1, 3), (2, 2), (0, 0)]:
        block = hessian[offsets[j] : offsets[j + 1], offsets[i] : offsets[i + 1]]
        k_in, k_out = linear_chain_cross_block(weights, x, first=i, second=j)
        torch.testing.assert_close(block, torch.kron(k_out, k_in), atol=1e-12, rtol=1e-12)

"""Certified lower bounds on σ₁(H) = max |λ(H)| from a few Hessian-vector products.

* **Rayleigh quotients**: ``|vᵀHv| / ‖v‖² ≤ σ₁(H)`` for any v ≠ 0.
* **Rayleigh–Ritz** on a subspace: for orthonormal Q (n×r), the eigenvalues of ``QᵀHQ`` interlace
  those of H (Poincaré separation), so ``‖QᵀHQ‖₂ ≤ σ₁(H)``; r products give r directions' best
  combination.
* **Weight-spectrum bound** for a linear layer followed by a linear layer (SpecDef's inflated →
  compensation pair): see :func:`pair_spectral_bound` and ``docs/theory.md``.

"Certified" means: a true lower bound up to the floating-point error of the products themselves
(relative ≈ 1e-13 in float64), with no convergence assumption — unlike a Lanczos estimate that has
not converged, these values can only be *below* σ₁(H), never above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specdef.curvature.estimators import lanczos
from specdef.curvature.hvp import HessianOperator, LossFn, hessian_mode
from specdef.errors import SpecdefError


@dataclass(frozen=True)
class Certificate:
    """Lower bounds on σ₁(H) from explicit directions."""

    value: float  # max(best Rayleigh quotient, Ritz value): the certified bound
    rayleigh: tuple[float, ...]  # vᵀHv/‖v‖² per direction (signed)
    ritz: float  # ‖QᵀHQ‖₂ over the span of all directions
    labels: tuple[str, ...]
    hvps: int


def rayleigh_certificate(
    op: HessianOperator, directions: Sequence[torch.Tensor], labels: Sequence[str] | None = None
) -> Certificate:
    """Rayleigh quotients of ``directions`` (flat vectors over ``op``'s block) and their Ritz value.

    One Hessian-vector product per direction. ``op`` must be a symmetric (diagonal) block; the
    bound holds for the full Hessian by Poincaré separation.
    """
    if not op.symmetric:
        raise SpecdefError("A Rayleigh certificate needs a symmetric (diagonal) Hessian block.")
    if not directions:
        raise SpecdefError("No directions given for the Rayleigh certificate.")
    names = list(labels) if labels is not None else [f"v{i}" for i in range(len(directions))]
    start = op.hvps
    vs = torch.stack([d.reshape(-1).to(op.dtype) for d in directions], dim=1)
    hv = torch.stack([op.matvec(vs[:, i]) for i in range(vs.shape[1])], dim=1)
    v64, h64 = vs.double(), hv.double()
    quotients = ((v64 * h64).sum(0) / (v64 * v64).sum(0)).tolist()
    # Ritz value on span(V): orthonormalize V = Q R and form QᵀHQ = R⁻ᵀ (VᵀHV) R⁻¹, dropping
    # near-dependent directions whose R pivot would amplify rounding
    _q, r = torch.linalg.qr(v64)
    keep = r.diagonal().abs() > 1e-10 * r.diagonal().abs().max()
    small = v64[:, keep].T @ h64[:, keep]
    rinv = torch.linalg.inv(r[keep][:, keep])
    projected = rinv.T @ small @ rinv
    projected = (projected + projected.T) / 2
    ritz = float(torch.linalg.eigvalsh(projected).abs().max())
    best = max(abs(x) for x in quotients)
    return Certificate(
        value=max(best, ritz),
        rayleigh=tuple(float(x) for x in quotients),
        ritz=ritz,
        labels=tuple(names),
        hvps=op.hvps - start,
    )


def top_singular_triplets(
    weight: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U[:, :count], S[:count], V[:, :count])`` of a 2-D weight, in float64."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    count = min(count, s.numel())
    return u[:, :count], s[:count], vh[:count].T


def compensation_directions(
    inflated_weight: torch.Tensor, top: int = 1
) -> tuple[list[torch.Tensor], list[str]]:
    """Rank-1 directions ``ũ_j ũ_iᵀ`` (m×m, unit Frobenius norm, i, j < top) in a compensation
    weight, built from the inflated weight's top left singular vectors ũ.

    Why these: the compensation layer's input is ``h = W̃x``, whose energy along ũ_i is
    ``σ_i(W̃)·ṽ_iᵀx`` — α times larger than before the defense. For ``E = a ũ_iᵀ`` the Hessian
    quadratic form is exactly ``σ_i(W̃)²·aᵀM_i a`` (``docs/theory.md``), so it grows as α²; the
    output side ``a = ũ_j`` is a cheap guess for the best ``a`` (the top eigenvector of ``M_i``).
    """
    u, _, _ = top_singular_triplets(inflated_weight, top)
    dirs, labels = [], []
    for i in range(u.shape[1]):
        for j in range(u.shape[1]):
            dirs.append(torch.outer(u[:, j], u[:, i]))
            labels.append(f"u{j}·u{i}ᵀ")
    return dirs, labels


@dataclass(frozen=True)
class SpectralBound:
    """``σ₁(H) ≥ max_i σ_i(W̃)²·κ_i`` for one inflated → compensation pair.

    ``kappas[i]`` = the largest-magnitude eigenvalue of ``M_i`` (signed; ``|κ_i| = ‖M_i‖₂``) with ``M_i = Σ_t (ṽ_iᵀx_t)(ṽ_iᵀx_s) ∂²L/∂z_t∂z_s`` (x: the inflated
    layer's inputs, z: the compensation layer's outputs, t, s over samples / tokens): a data and
    downstream factor that the defense does not change. When ``κ_i > 0`` the term also bounds
    ``λ_max(H)`` (the learning-rate ceiling), not only σ₁. ``products`` counts Hessian-vector
    products in activation space (z), each cheaper than a parameter-space one.
    """

    value: float
    sigmas: tuple[float, ...]
    kappas: tuple[float, ...]
    terms: tuple[float, ...]
    products: int
    output_directions: tuple[torch.Tensor, ...] = field(default=(), repr=False, compare=False)
    input_directions: tuple[torch.Tensor, ...] = field(default=(), repr=False, compare=False)


class _ActivationHessian:
    """``a ↦ M_i a`` for one right singular direction, with graphs kept per batch."""

    def __init__(self, graphs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.graphs = graphs
        z0 = graphs[0][0]
        self.shape = (int(z0.shape[-1]), int(z0.shape[-1]))
        self.dtype, self.device = z0.dtype, z0.device
        self.hvps = 0
        self.coeffs: list[torch.Tensor] = []

    def matvec(self, a: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for (z, g, _), c in zip(self.graphs, self.coeffs, strict=True):
            probe = c.unsqueeze(-1) * a
            (hz,) = torch.autograd.grad((g * probe).sum(), z, retain_graph=True)
            out += (c.unsqueeze(-1) * hz).reshape(-1, self.shape[0]).sum(0) / len(self.graphs)
        self.hvps += 1
        return out


def pair_spectral_bound(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    inflated: nn.Linear,
    compensation: nn.Linear,
    *,
    top: int = 1,
    max_iter: int = 30,
    tol: float = 1e-6,
) -> SpectralBound:
    """The weight-spectrum lower bound of one pair ``z = C·(W̃·x) + b`` inside ``model``.

    For each of the ``top`` singular triplets (σ_i, ũ_i, ṽ_i) of W̃ and any unit output direction
    a, the compensation-weight direction ``E = a ũ_iᵀ`` has Hessian quadratic form exactly
    ``σ_i²·aᵀM_i a``; Lanczos on the m×m operator M_i finds the best a. The returned value is thus
    a Rayleigh quotient of H, a certified bound; its α-dependence is only through σ_i(W̃).
    """
    if compensation.in_features != inflated.out_features:
        raise SpecdefError(
            f"Expected compensation input size {inflated.out_features} (the inflated layer's "
            f"output), found {compensation.in_features}; pass a matching inflated/compensation pair."
        )
    left, sigmas, right = top_singular_triplets(inflated.weight, top)
    graphs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    captured: dict[str, Any] = {}

    def grab_input(_: nn.Module, args: tuple[Any, ...]) -> None:
        captured["x"] = args[0].detach()

    def leaf_output(_: nn.Module, __: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if "z" in captured:
            raise SpecdefError(
                "The compensation layer ran twice in one forward pass; the spectral bound needs "
                "each defended layer to be applied once per batch."
            )
        captured["z"] = out.detach().requires_grad_(True)
        return captured["z"]

    handles = [
        inflated.register_forward_pre_hook(grab_input),
        compensation.register_forward_hook(leaf_output),
    ]
    terms, kappas, outs = [], [], []
    try:
        with hessian_mode(model, []):
            for batch in batches:
                captured.clear()
                loss = loss_fn(model, batch)
                if "z" not in captured:
                    raise SpecdefError(
                        "The compensation layer did not run on this batch; pass the pair's "
                        "own model and a batch that reaches it."
                    )
                (g,) = torch.autograd.grad(loss, captured["z"], create_graph=True)
                graphs.append((captured["z"], g, captured["x"]))
            op = _ActivationHessian(graphs)
            for i in range(sigmas.numel()):
                v = right[:, i].to(op.dtype).to(op.device)
                op.coeffs = [x @ v for _, _, x in graphs]
                res = lanczos(op, 1, which="LM", max_iter=min(max_iter, op.shape[0]), tol=tol)
                kappa = res.eigenvalues[0]
                kappas.append(kappa)
                terms.append(float(sigmas[i]) ** 2 * abs(kappa))
                if res.eigenvectors is not None:
                    outs.append(res.eigenvectors[:, 0].detach().double().cpu())
    finally:
        for h in handles:
            h.remove()
    return SpectralBound(
        value=max(terms),
        sigmas=tuple(float(s) for s in sigmas),
        kappas=tuple(kappas),
        terms=tuple(terms),
        products=op.hvps,
        output_directions=tuple(outs),
        input_directions=tuple(left.T.contiguous()),
    )


@dataclass(frozen=True)
class ProductBound:
    """Lower bounds on σ₁(L·M·R) from the singular values of the factors and the principal-angle
    cosines between their singular vectors (the paper's Theorem-3 form), and the exact value.

    ``paper``: ``max_{r1,r2} σ_{r1}(L)·σ₁(M)·σ_{r2}(R)·cos θ₁·cos θ₂`` with ``cos θ₁ = |ℓ_{r1}ᵀ u₁|``
    (ℓ: right singular vectors of L, u₁: M's top left one) and ``cos θ₂ = |v₁ᵀ ρ_{r2}|`` (v₁: M's
    top right one, ρ: left singular vectors of R). Keeps only M's top singular pair, so it is *not*
    a bound in general (the other pairs of M can cancel it); ``rayleigh``:
    ``max σ_{r1}(L)·σ_{r2}(R)·|ℓ_{r1}ᵀ M ρ_{r2}|``, the same choice of directions with all of M — a
    true lower bound (a bilinear Rayleigh quotient); ``exact``: σ₁(L·M·R) from an SVD.
    """

    paper: float
    rayleigh: float
    exact: float


def product_bound(
    left: torch.Tensor | None, middle: torch.Tensor, right: torch.Tensor
) -> ProductBound:
    """:class:`ProductBound` of ``left (a×m) · middle (m×n) · right (n×b)``, in float64.
    ``left=None``: the two-factor product ``middle · right`` (ℓ = u₁, σ = 1, cos θ₁ = 1)."""
    mf, rf = (t.detach().to(torch.float64) for t in (middle, right))
    if left is None:
        lf = torch.linalg.svd(mf, full_matrices=False)[0][:, :1].T
    else:
        lf = left.detach().to(torch.float64)
    if lf.shape[1] != mf.shape[0] or mf.shape[1] != rf.shape[0]:
        raise SpecdefError(
            f"product_bound needs conformable factors; found {tuple(lf.shape)} · "
            f"{tuple(mf.shape)} · {tuple(rf.shape)}."
        )
    _, s_l, vh_l = torch.linalg.svd(lf, full_matrices=False)  # rows of vh_l: ℓ_r
    u_r, s_r, _ = torch.linalg.svd(rf, full_matrices=False)  # columns of u_r: ρ_r
    u_m, s_m, vh_m = torch.linalg.svd(mf, full_matrices=False)
    cos1 = (vh_l @ u_m[:, 0]).abs()  # per r1
    cos2 = (vh_m[0] @ u_r).abs()  # per r2
    paper = float(s_m[0] * torch.outer(s_l * cos1, s_r * cos2).max())
    coupling = (vh_l @ mf @ u_r).abs()  # ℓ_{r1}ᵀ M ρ_{r2}
    rayleigh = float((s_l[:, None] * coupling * s_r[None, :]).max())
    exact = float(torch.linalg.matrix_norm(lf @ mf @ rf, ord=2))
    return ProductBound(paper=paper, rayleigh=rayleigh, exact=exact)


def linear_chain_cross_block(
    weights: Sequence[torch.Tensor], inputs: torch.Tensor, *, first: int, second: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Kronecker factors ``(K_in, K_out)`` of the Hessian block ``H[A_j, A_i]`` (j = second,
    i = first) of a deep linear network ``f = A_d ⋯ A_1 x`` with loss ``½·mean_t ‖f(x_t) − y_t‖²``
    at zero residual (``y = f(x)``, where H is exactly the Gauss-Newton matrix):

        K_in = A_{j−1}⋯A_1 Σ A_1ᵀ⋯A_{i−1}ᵀ,   K_out = P_jᵀ P_i,

    ``Σ = mean_t x_t x_tᵀ``, ``P_i = A_d⋯A_{i+1}`` (the map after layer i); the block is
    ``K_out ⊗ K_in`` for torch's row-major ``flatten`` (``K_in ⊗ K_out`` stacking columns), so
    ``σ₁(H) ≥ σ₁(K_in)·σ₁(K_out)`` (Poincaré separation). The weights between the two layers sit
    in the middle of ``K_in`` — the paper's A·B·C. ``first <= second`` are 0-based layer indices
    (equal: a diagonal block); ``inputs`` is (T, n₀).
    """
    if not 0 <= first <= second < len(weights):
        raise SpecdefError(
            f"Need 0 <= first <= second < {len(weights)} layers; found first={first}, "
            f"second={second}."
        )
    ws = [w.detach().to(torch.float64) for w in weights]
    x = inputs.detach().to(torch.float64)
    sigma = x.T @ x / x.shape[0]

    def chain(lo: int, hi: int, size: int) -> torch.Tensor:  # A_hi ⋯ A_lo (identity if empty)
        out = torch.eye(size, dtype=torch.float64)
        for w in ws[lo : hi + 1]:
            out = w @ out
        return out

    below_i = chain(0, first - 1, x.shape[1])  # A_{i−1}⋯A_1
    below_j = chain(0, second - 1, x.shape[1])  # A_{j−1}⋯A_1
    k_in = below_j @ sigma @ below_i.T
    after_i = chain(first + 1, len(ws) - 1, ws[first].shape[0])
    after_j = chain(second + 1, len(ws) - 1, ws[second].shape[0])
    return k_in, after_j.T @ after_i

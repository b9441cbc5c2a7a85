"""Spectral estimators on a Hessian operator, each reporting the Hessian-vector products it used.

Every estimate here is also a *certified lower bound* (up to floating-point error): a Ritz value of
a symmetric operator lies in ``[λ_min, λ_max]`` (so ``|θ| ≤ σ₁``), a Rayleigh quotient
``vᵀHv/‖v‖²`` likewise, and ``‖A v‖/‖v‖ ≤ σ₁(A)`` for any block ``A``. More iterations only tighten.

The operator protocol is :class:`specdef.curvature.hvp.HessianOperator`'s: ``shape``, ``dtype``,
``device``, ``hvps``, ``matvec`` (and ``rmatvec`` for a non-symmetric block).
:class:`MatrixOperator` wraps an explicit matrix with the same protocol (tests, benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from specdef.curvature.hvp import LossFn, ParamSpec, double_backward_safe, select_parameters
from specdef.errors import SpecdefError

WHICH = ("LA", "SA", "LM")
# full reorthogonalization keeps every Lanczos vector; above this many stored numbers (≈2 GB in
# float64) only the three-term recurrence is kept, which still gives valid extreme Ritz values
_REORTH_BUDGET = 2**28


class Operator(Protocol):
    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    @property
    def hvps(self) -> int: ...

    def matvec(self, vector: torch.Tensor) -> torch.Tensor: ...


class MatrixOperator:
    """An explicit matrix behind the operator protocol (``hvps`` counts products)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.dtype, self.device = matrix.dtype, matrix.device
        self.hvps = 0

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        self.hvps += 1
        return self.matrix @ vector

    def rmatvec(self, vector: torch.Tensor) -> torch.Tensor:
        self.hvps += 1
        return self.matrix.T @ vector


@dataclass(frozen=True)
class EigenResult:
    """Eigenvalue estimates, best first (by ``which``), and what they cost."""

    eigenvalues: tuple[float, ...]
    hvps: int
    converged: bool
    residuals: tuple[float, ...] = ()
    history: tuple[float, ...] = ()  # leading estimate after each Hessian-vector product
    eigenvectors: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SigmaResult:
    """Largest singular value estimate of a (block) operator and its cost."""

    sigma: float
    hvps: int
    converged: bool
    history: tuple[float, ...] = ()


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of ``tr(H)`` with its standard error."""

    trace: float
    stderr: float
    hvps: int


def _start(op: Operator, seed: int, v0: torch.Tensor | None) -> torch.Tensor:
    n = op.shape[1]
    if v0 is not None:
        v = v0.detach().to(dtype=op.dtype, device=op.device).reshape(-1).clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    norm = float(v.norm())
    if norm == 0 or not math.isfinite(norm):
        raise SpecdefError("The start vector is zero or not finite; pass another v0 or seed.")
    return v / norm


def _wanted(values: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "LA":
        order = torch.argsort(values, descending=True)
    elif which == "SA":
        order = torch.argsort(values)
    else:
        order = torch.argsort(values.abs(), descending=True)
    return order[:k]


def lanczos(
    op: Operator,
    k: int = 1,
    *,
    which: str = "LA",
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    v0: torch.Tensor | None = None,
    reorthogonalize: bool | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> EigenResult:
    """k extreme eigenvalues of a symmetric operator by Lanczos (one product per step).

    After j steps the tridiagonal ``T_j = Q_jᵀ H Q_j`` gives Ritz values θ with residuals
    ``‖H y − θ y‖ = |β_j s_j|`` (s_j the last entry of θ's eigenvector of T_j); we stop when the k
    wanted ones satisfy ``|β_j s_j| ≤ tol·|θ|``, on an invariant subspace (β ≈ 0), or at
    ``max_iter``. With ``reorthogonalize`` (default: when the basis fits in memory) each new vector
    is orthogonalized twice against all previous ones (Gram–Schmidt, "twice is enough"), so no
    spurious copies appear and eigenvectors are returned; otherwise only the three-term recurrence
    is kept (memory of three vectors) and eigenvectors are not returned.
    """
    if which not in WHICH:
        raise SpecdefError(f"which must be one of {', '.join(WHICH)}, found {which!r}.")
    n = op.shape[1]
    if op.shape[0] != n:
        raise SpecdefError(f"Lanczos needs a square symmetric operator, found shape {op.shape}.")
    steps = min(max_iter, n)
    if k < 1 or k > steps:
        raise SpecdefError(f"k must be in [1, {steps}] (max_iter and size), found {k}.")
    full = reorthogonalize if reorthogonalize is not None else n * (steps + 1) <= _REORTH_BUDGET
    start = op.hvps
    q = _start(op, seed, v0)
    basis: list[torch.Tensor] = [q]
    q_prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    beta = 0.0
    values = torch.zeros(0, dtype=torch.float64)
    vectors = torch.zeros(0, 0, dtype=torch.float64)
    idx = torch.zeros(0, dtype=torch.long)
    converged = False
    for j in range(steps):
        w = op.matvec(q)
        a = float(torch.dot(w, q))
        w = w - a * q - beta * q_prev
        if full:
            for _ in range(2):
                stacked = torch.stack(basis)
                w = w - stacked.T @ (stacked @ w)
        alphas.append(a)
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tri)
        idx = _wanted(values, which, min(k, j + 1))
        history.append(float(values[idx[0]]))
        if callback is not None:
            callback(op.hvps - start, history[-1])
        residuals = (beta * vectors[-1, idx]).abs()
        done = len(idx) == k and bool(
            (residuals <= tol * values[idx].abs().clamp_min(1e-300)).all()
        )
        if done or beta <= 1e-12 * max(abs(a), 1e-300) or j == steps - 1:
            converged = done or beta <= 1e-12 * max(abs(a), 1e-300)
            break
        betas.append(beta)
        q_prev, q = q, w / beta
        if full:
            basis.append(q)
        else:
            basis = [q]
    eigvecs = None
    if full:
        ritz = vectors[:, idx].to(op.dtype).to(op.device)
        eigvecs = torch.stack(basis[: ritz.shape[0]]).T @ ritz
    return EigenResult(
        eigenvalues=tuple(float(x) for x in values[idx]),
        hvps=op.hvps - start,
        converged=converged,
        residuals=tuple(float(x) for x in (beta * vectors[-1, idx]).abs()),
        history=tuple(history),
        eigenvectors=eigvecs,
    )


def arpack_eigsh(op: Any, k: int = 1, *, which: str = "LA", tol: float = 1e-8) -> EigenResult:
    """k extreme eigenvalues via SciPy's ARPACK (implicitly restarted Lanczos) on ``op.to_scipy()``."""
    from scipy.sparse.linalg import eigsh

    if which not in WHICH:
        raise SpecdefError(f"which must be one of {', '.join(WHICH)}, found {which!r}.")
    start = op.hvps
    vals, vecs = eigsh(op.to_scipy(), k=k, which=which, tol=tol)
    order = _wanted(torch.from_numpy(vals), which, k)
    return EigenResult(
        eigenvalues=tuple(float(vals[i]) for i in order),
        hvps=op.hvps - start,
        converged=True,
        eigenvectors=torch.from_numpy(vecs[:, order.numpy()]),
    )


def power_iteration(
    op: Operator,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    v0: torch.Tensor | None = None,
) -> EigenResult:
    """Dominant (largest-magnitude) eigenvalue, sign kept, by power iteration.

    Estimate after each product: the Rayleigh quotient ``vᵀHv`` of the current unit vector; stop
    when it changes by at most ``tol`` relative. Converges at rate ``|λ₂/λ₁|`` per product.
    """
    start = op.hvps
    v = _start(op, seed, v0)
    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        w = op.matvec(v)
        history.append(float(torch.dot(v, w)))
        norm = float(w.norm())
        if norm == 0:
            converged = True
            break
        v = w / norm
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
            converged = True
            break
    return EigenResult(
        eigenvalues=(history[-1],),
        hvps=op.hvps - start,
        converged=converged,
        history=tuple(history),
        eigenvectors=v.unsqueeze(1),
    )


def block_sigma_max(
    op: Any, *, max_iter: int = 50, tol: float = 1e-6, seed: int = 0
) -> SigmaResult:
    """σ₁ of a (rectangular) block ``A = H[rows, columns]`` by power iteration on ``AᵀA``.

    Each iteration costs two products (``A v`` and ``Aᵀ(Av)``); the estimate ``‖Aᵀ A v‖/‖A v‖``
    is at most σ₁(A) ≤ σ₁(H) (Poincaré separation for off-diagonal blocks).
    """
    start = op.hvps
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.shape[1], generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    v = v / v.norm()
    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        w = op.matvec(v)
        wn = float(w.norm())
        if wn == 0:
            history.append(0.0)
            converged = True
            break
        u = op.rmatvec(w / wn)
        history.append(max(wn, float(u.norm())))
        v = u / u.norm()
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * history[-1]:
            converged = True
            break
    return SigmaResult(
        sigma=history[-1], hvps=op.hvps - start, converged=converged, history=tuple(history)
    )


def hutchinson_trace(op: Operator, *, samples: int = 10, seed: int = 0) -> TraceResult:
    """``tr(H) ≈ mean_i z_iᵀ H z_i`` with Rademacher ``z_i``; ``stderr`` = sample std / √samples."""
    if samples < 1:
        raise SpecdefError(f"samples must be ≥ 1, found {samples}.")
    start = op.hvps
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        z = torch.randint(0, 2, (op.shape[1],), generator=gen).to(op.dtype).to(op.device) * 2 - 1
        values.append(float(torch.dot(z, op.matvec(z))))
    t = torch.tensor(values, dtype=torch.float64)
    stderr = float(t.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else math.inf
    return TraceResult(trace=float(t.mean()), stderr=stderr, hvps=op.hvps - start)


MAX_DENSE_PARAMETERS = 20_000


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], *, block: ParamSpec = None
) -> torch.Tensor:
    """The exact Hessian of the mean loss over ``block`` as a dense matrix (tiny models only).

    Computed by :func:`torch.autograd.functional.hessian` of a function of the flattened block
    (through :func:`torch.func.functional_call`), independently of :class:`HessianOperator`.
    """
    chosen = select_parameters(model, block)
    sizes = [p.numel() for _, p in chosen]
    if sum(sizes) > MAX_DENSE_PARAMETERS:
        raise SpecdefError(
            f"A dense Hessian needs ≤ {MAX_DENSE_PARAMETERS} parameters, found {sum(sizes)}; "
            "use HessianOperator with lanczos() instead, or pick a smaller block."
        )
    names = [n for n, _ in chosen]
    theta = torch.cat([p.detach().reshape(-1) for _, p in chosen])

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        params = {n: v.view_as(p) for n, v, (_, p) in zip(names, pieces, chosen, strict=True)}
        total = torch.zeros((), dtype=flat.dtype, device=flat.device)
        for batch in batches:
            total = total + _loss_with(model, loss_fn, batch, params)
        return total / len(batches)

    was_training = model.training
    model.eval()
    try:
        with double_backward_safe(model):
            try:  # vmap over the second backward: several times faster where every op supports it
                hess = torch.autograd.functional.hessian(mean_loss, theta, vectorize=True)
            except (RuntimeError, NotImplementedError):
                hess = torch.autograd.functional.hessian(mean_loss, theta)
    finally:
        model.train(was_training)
    return hess.detach()


class _Bound(nn.Module):
    """Calls ``loss_fn(model, batch)`` so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _loss_with(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    wrapper = _Bound(model, loss_fn)
    prefixed = {f"model.{n}": v for n, v in params.items()}
    out: torch.Tensor = torch.func.functional_call(wrapper, prefixed, (batch,), strict=False)
    return out

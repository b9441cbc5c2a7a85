"""Pure tensor math of the SpecDef deformation (no ``nn.Module``; imports only :mod:`specdef.errors`).

For a weight ``W`` (m×n) and an orthonormal basis ``U_k`` (m×k) of its top-k left singular
subspace, with ``P = U_k U_kᵀ``::

    T  = I + (α − 1)·P          (multiplies the top-k singular values by α)
    W̃  = T·W                    (the *inflated* weight)
    C  = T⁻¹ = I + (1/α − 1)·P  (the *compensation*, m×m)

``C·W̃ = W`` holds for **any** orthonormal ``U_k`` (P is an orthogonal projector, so
``(I + (1/α−1)P)(I + (α−1)P) = I``); an exact SVD is only needed for the singular values of
``W̃`` to be exactly ``α·σ_i`` on the top k. A randomized range finder therefore keeps the function
exact and costs O(m·n·k) instead of a full SVD.

Everything is computed in float64: rounding in the model's dtype is measured separately by
:func:`reconstruction_error`, because the entries of ``W̃`` live at scale ``α·σ₁`` and rounding
them swamps the lower singular directions once ``α·eps(dtype)`` approaches the tolerance.
"""

from __future__ import annotations

import functools
import math

import torch

from specdef.errors import SpecdefError

METHODS = ("exact", "randomized")
# Subspace iterations of the randomized range finder: the smallest count whose inflated spectrum
# meets the accuracy docs/algorithm.md promises (every top-k direction of every layer inflated to
# ≥ 0.94·α, i.e. min_i σ_i(U_kᵀW)/σ_i(W) ≥ 0.94), measured on SmolLM2-135M's 210 linear layers at
# k = 25 by benchmarks/defend_speed.py (docs/benchmarks.md, "Defense speed": 3 iterations reach
# 0.92 on the worst layer, 4 reach 0.95). Trained weights have nearly flat spectra around σ_k
# (σ_{k+1}/σ_k ≈ 0.99), which is what makes fewer iterations fall short.
POWER_ITERS = 4
PROBE_COLUMNS = 16
# rows per block of deform_with_basis(dtype=...): a 64×n float64 block (≤ 3 MB at n = 5632) stays in
# cache between its product and its cast; 32–64 measured fastest on SmolLM2's 1536×576 layers
DEFORM_ROWS = 64


def all_finite(tensor: torch.Tensor) -> bool:
    """True when every entry is finite. A sum is finite only when every entry is (a NaN or ±Inf
    propagates), and reading the tensor once in its own dtype, without a boolean temporary, is
    ≈20× faster than ``isfinite(t).all()`` (and ≈6× faster than a float64-accumulated sum of a
    float32 tensor); a non-finite sum — a bad entry, or finite entries whose sum overflows the
    dtype (float16 above 65504) — falls back to the elementwise check, which decides."""
    if tensor.is_floating_point() and bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _check(weight: torch.Tensor, top_k: int, *, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise SpecdefError(
            f"{name}: expected a 2-D weight matrix, found shape {tuple(weight.shape)}."
        )
    m, n = weight.shape
    if top_k < 1 or top_k > min(m, n):
        raise SpecdefError(
            f"{name}: top_k must be in [1, {min(m, n)}] (the rank bound min(m, n) of a {m}×{n} "
            f"weight), found {top_k}; choose a smaller --top-k or exclude this layer."
        )
    if not all_finite(weight):
        raise SpecdefError(
            f"{name}: weight contains NaN or Inf entries; repair the checkpoint before defending it."
        )


def top_subspace(
    weight: torch.Tensor,
    top_k: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = POWER_ITERS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Orthonormal basis (m×k, float64) of the top-k left singular subspace of ``weight`` (m×n).

    ``method="exact"`` takes the first k left singular vectors of a full SVD. ``"randomized"`` is
    Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1: a Gaussian sketch ``W·Ω`` with ``k +
    oversample`` columns, ``power_iters`` subspace iterations re-orthonormalised after each
    multiplication (stable against the ``σ^(2q+1)`` dynamic range; Cholesky QR in between,
    Householder QR for the last one, see :func:`_span_basis`), then an SVD of the small projected
    matrix. Cost O(m·n·(k + oversample)·(2·power_iters + 2)).
    """
    return top_subspace_and_values(
        weight,
        top_k,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        generator=generator,
    )[0]


def top_subspace_and_values(
    weight: torch.Tensor,
    top_k: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = POWER_ITERS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_subspace` and, from the same factorisation, singular values (float64,
    descending): all of them for ``"exact"``, the top ``k + oversample`` estimates for
    ``"randomized"`` (accurate to the power-iteration error)."""
    _check(weight, top_k)
    if method not in METHODS:
        raise SpecdefError(f"Unknown method {method!r}; expected one of {', '.join(METHODS)}.")
    w = weight.detach().to(dtype=torch.float64)
    m, n = w.shape
    if method == "exact" or top_k + oversample >= min(m, n):
        if m < n:
            # the same SVD through Wᵀ = V Σ Uᵀ: LAPACK's SVD of a tall matrix is ≈1.8× faster than of
            # the wide one (576×1536: 205 vs 365 ms, one thread, MKL)
            _, s, vh = torch.linalg.svd(w.T, full_matrices=False)
            return vh[:top_k].T.contiguous(), s
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
        return u[:, :top_k].contiguous(), s
    width = top_k + oversample
    omega = torch.randn(n, width, dtype=torch.float64, generator=generator, device="cpu")
    # layouts: W (row-major) times a column-major block is a fast GEMM form (≈1.4× a row-major Ω;
    # the copy of the small Ω is O(n·width)), and Wᵀq for the column-major q that QR returns is
    # computed as (qᵀW)ᵀ — the same product, 2–9× faster than ``w.T @ q`` on SmolLM2's shapes (one
    # thread; docs/benchmarks.md, "Defense speed")
    omega = omega.T.contiguous().T
    q = _span_basis(w @ omega.to(w.device))
    for step in range(power_iters):
        z = _span_basis((q.T @ w).T)
        q = _span_basis(w @ z) if step < power_iters - 1 else torch.linalg.qr(w @ z)[0]
    small = q.T @ w  # (k+p)×n; q from Householder QR, orthonormal to float64 eps
    u_small, s, _ = torch.linalg.svd(small, full_matrices=False)
    basis = q @ u_small[:, :top_k]
    # one more QR: keeps ‖UᵀU − I‖ at float64 eps, which C·W̃ = W relies on
    basis, r = torch.linalg.qr(basis)
    return basis * torch.sign(torch.diagonal(r)).unsqueeze(0), s


def _span_basis(block: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of span(``block``) (columns) for the power iterations, which need the span
    kept well conditioned, not orthonormality to eps: Cholesky QR (Q = Y·R⁻¹, R = chol(YᵀY), one
    l×l factorisation; loses orthogonality as eps·κ(Y)², 1e-12 at κ = 100) with Householder QR
    when Y is ill-conditioned (κ > 1e6 — a rank-deficient W) or the factorisation fails."""
    gram = block.T @ block
    chol, info = torch.linalg.cholesky_ex(gram)
    diag = torch.diagonal(chol)
    if int(info) != 0 or not float(diag.min()) > 1e-6 * float(diag.max()):
        return torch.linalg.qr(block)[0]
    return torch.linalg.solve_triangular(chol.T, block, upper=True, left=False)


def deform_with_basis(
    weight: torch.Tensor, alpha: float, basis: torch.Tensor, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W̃, C)`` from an orthonormal ``basis`` U_k (m×k) of W's output space, computed in float64
    and returned in float64, or rounded to ``dtype`` when given (the stored pair).

    With a narrower ``dtype``, both are computed in blocks of :data:`DEFORM_ROWS` rows, each cast
    into the output while it is still in cache, without the m×n and m×m float64 temporaries: ≈1.5×
    faster for the inflated weight, whose fused product is memory-bound. A block's product can
    differ from the whole one's in the last float64 bit (the GEMM's own blocking), which rounding
    to float32 or narrower hides but for an entry within one float64 ulp of a rounding midpoint.
    """
    if not alpha > 1 or not math.isfinite(alpha):
        raise SpecdefError(f"alpha must be a finite number > 1, found {alpha}; e.g. --alpha 1e4.")
    w = weight.detach().to(dtype=torch.float64)
    u = basis.to(dtype=torch.float64, device=w.device)
    m = w.shape[0]
    if u.shape[0] == m and u.shape[1] == m:
        # P = I exactly: avoid the cancellation I − P, whose eps-sized residue would be amplified by α
        full = alpha * w, torch.eye(m, dtype=torch.float64, device=w.device) / alpha
        return full if dtype is None else (full[0].to(dtype), full[1].to(dtype))
    # one pass over each output (a fused W + (α−1)·U(UᵀW); C = ((1/α−1)·U)Uᵀ + I), one m×m
    # buffer; equal to the separate product, scaling and sum up to float64 rounding
    projected = u.T @ w
    scaled = u * (1.0 / alpha - 1.0)  # scale the m×k factor, not the m×m product
    if dtype is None or dtype == torch.float64:
        inflated = torch.addmm(w, u, projected, alpha=alpha - 1.0)
        compensation = scaled @ u.T
        compensation.diagonal().add_(1.0)
        return inflated, compensation
    inflated = torch.empty(w.shape, dtype=dtype, device=w.device)
    compensation = torch.empty(m, m, dtype=dtype, device=w.device)
    for start in range(0, m, DEFORM_ROWS):
        rows = slice(start, start + DEFORM_ROWS)
        inflated[rows] = torch.addmm(w[rows], u[rows], projected, alpha=alpha - 1.0)
        block = scaled[rows] @ u.T
        block[:, rows].diagonal().add_(1.0)
        compensation[rows] = block
    return inflated, compensation


def spectral_deform(
    weight: torch.Tensor,
    alpha: float,
    top_k: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = POWER_ITERS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inflate the top-k singular values of ``weight`` (m×n) by ``alpha``.

    Returns ``(W̃, C)``: float64 tensors of shape m×n and m×m with ``C·W̃ = W`` (up to float64
    rounding, relative error ≈ eps₆₄·α). ``alpha > 1``; ``1 ≤ top_k ≤ min(m, n)``.
    """
    basis = top_subspace(
        weight,
        top_k,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        generator=generator,
    )
    return deform_with_basis(weight, alpha, basis)


def reconstruction_error(
    weight: torch.Tensor,
    inflated: torch.Tensor,
    compensation: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
) -> float:
    """‖C·W̃ − W‖_F / ‖W‖_F with ``W̃`` and ``C`` rounded to ``dtype`` and multiplied in it.

    This is what the model computes when stored and run in ``dtype``. Returns ``inf`` when the
    product overflows (fp16 above 65504) or is not finite.
    """
    w = weight.detach().to(dtype=torch.float64)
    norm = float(torch.linalg.matrix_norm(w))
    product = compensation.detach().to(dtype) @ inflated.detach().to(dtype)
    if not bool(torch.isfinite(product).all()):
        return math.inf
    diff = float(torch.linalg.matrix_norm(product.to(torch.float64) - w))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def deformed_spectrum(values: torch.Tensor, alpha: float, top_k: int) -> torch.Tensor:
    """The singular values of W̃ from those :func:`top_subspace_and_values` returned with its basis
    (1-D, descending): ``(α·σ₁, …, α·σ_k, σ_{k+1}, …)`` — no second decomposition.

    Exact method: with ``W = U Σ Vᵀ`` and ``P = U_k U_kᵀ``, ``W̃ = W + (α−1)·P·W = U·diag(α·σ_{≤k},
    σ_{>k})·Vᵀ`` is again an SVD, and the order holds because ``α·σ_k > σ_k ≥ σ_{k+1}`` (α > 1).
    Randomized method: with the range finder's ``B = QᵀW = Ũ S Ṽᵀ`` and ``U_k = Q·Ũ_{:k}``,
    ``QᵀW̃ = B + (α−1)·Ũ_{:k}Ũ_{:k}ᵀB = Ũ·diag(α·s_{≤k}, s_{>k})·Ṽᵀ``: the values are exactly
    the singular values of W̃ projected on the same sketch as ``values`` are for W (the estimate the
    randomized report gives for both). These are the float64 W̃'s; rounding W̃ to the stored dtype
    moves them by at most ‖W̃_stored − W̃‖₂ ≤ eps(dtype)·‖W̃‖_F (Weyl).
    """
    out = values.detach().to(torch.float64).clone()
    out[:top_k] *= alpha
    return out


def probe_reconstruction_error(
    weight: torch.Tensor,
    inflated: torch.Tensor,
    compensation: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    columns: int = PROBE_COLUMNS,
    seed: int = 1234,
) -> float:
    """The precision guard's per-layer error: ‖C_d(W̃_d·Ω) − W·Ω‖_F / ‖W·Ω‖_F for a Gaussian Ω
    (n×columns, fixed ``seed``), with W̃, C and Ω rounded to ``dtype`` and both products run in it —
    the stored pair applied to isotropic inputs as the model applies it. Cost O((m·n + m²)·columns)
    instead of the 2·m²·n of :func:`reconstruction_error`'s dense C·W̃.

    Bound. For a fixed A and Ω with iid N(0, 1) entries, ‖AΩ‖_F² = Σ_j σ_j(A)²·g_j with g_j iid
    χ²(p), p = ``columns``, so ‖AΩ‖_F²/p is unbiased for ‖A‖_F², and Laurent & Massart (2000,
    Lemma 1) give, each with probability ≥ 1 − e^(−x), ‖AΩ‖_F² ≥ (1 − 2√(x/(p·r)))·p·‖A‖_F² and
    ‖AΩ‖_F² ≤ (1 + 2√(x/(p·r)) + 2x/(p·r))·p·‖A‖_F², r = ‖A‖_F⁴/‖AᵀA‖_F² ≥ 1 (A's effective
    rank). With A = C_dW̃_d − W and A = W, the estimate is ≥ √((1 − 2√(x/(p·r_E))) /
    (1 + 2√(x/(p·r_W)) + 2x/(p·r_W))) × ‖C_dW̃_d − W‖_F/‖W‖_F with probability ≥ 1 − 2e^(−x):
    for p = 16, x = ln 200 (99 %) and effective ranks ≥ 10, at least 0.67× (rank 1: no useful lower
    bound; rounding errors spread over many directions). That is the storage error exactly when
    ``dtype`` is float64. In a narrower dtype the estimate also carries the rounding of the
    intermediate W̃_d·Ω, whose entries live at scale α·σ₁ — which the model's forward incurs too and
    the dense in-dtype product C_d·W̃_d does not: measured 1.2–2.5× :func:`reconstruction_error`
    on tiny-llama and SmolLM2 layers in float32 and bfloat16 (tests/linalg/test_spectral_floor.py
    checks 1–3× on layer-shaped power-law matrices), so the guard is stricter than with the dense
    product, never looser. ``inf`` when a product overflows
    or is not finite.
    """
    w = weight.detach().to(dtype=torch.float64)
    omega = _probe_block(w.shape[1], columns, seed).to(dtype)
    ref = w @ omega.to(device=w.device, dtype=torch.float64)
    inner = inflated.detach().to(dtype) @ omega.to(inflated.device)
    got = compensation.detach().to(dtype) @ inner
    if not all_finite(got):
        return math.inf
    diff = float(torch.linalg.matrix_norm(got.to(torch.float64) - ref))
    norm = float(torch.linalg.matrix_norm(ref))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


@functools.lru_cache(maxsize=16)
def _probe_block(rows: int, columns: int, seed: int) -> torch.Tensor:
    """The fixed Gaussian probe (rows×columns, float64), drawn once per shape: a model has a handful
    of input widths and hundreds of layers. Read-only."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, dtype=torch.float64, generator=gen)


def largest_singular_value(weight: torch.Tensor) -> float:
    """σ₁ of ``weight`` (float64) from the Gram matrix of its shorter side: ``√λ_max(G)`` with
    ``G = WWᵀ`` or ``WᵀW``. The largest eigenvalue of a symmetric matrix is perfectly conditioned
    (absolute error ≈ eps·‖G‖ = eps·σ₁²), so σ₁ comes out to float64 precision — squaring only
    hurts the small singular values, which are not needed — at 2–3× less than an SVD."""
    w = weight.detach().to(torch.float64)
    if w.numel() == 0:
        return 0.0
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def max_safe_alpha(
    weight: torch.Tensor,
    basis: torch.Tensor,
    *,
    dtype: torch.dtype,
    tolerance: float,
    start: float = 1e4,
    max_iters: int = 8,
) -> float:
    """The largest α (to ~1 significant digit, rounded down) whose reconstruction error in ``dtype``
    as the guard measures it (:func:`probe_reconstruction_error`) stays within ``tolerance`` for
    this weight and subspace; 1.0 when none does.

    Beyond small α the error grows linearly, err(α) ≈ c·eps(dtype)·α (rounding of W̃'s entries at
    scale α·σ₁), so each step rescales α by tolerance/err and the result is confirmed by a
    measurement. Each step costs one deformation and one probe.
    """
    alpha = float(start)
    best = 1.0
    for _ in range(max_iters):
        err = probe_reconstruction_error(
            weight, *deform_with_basis(weight, alpha, basis), dtype=dtype
        )
        if err <= tolerance:
            best = max(best, alpha)
            if err == 0.0 or err > 0.5 * tolerance:
                break
            alpha *= min(0.9 * tolerance / err, 100.0)
        else:
            ratio = tolerance / err if math.isfinite(err) and err > 0 else 1e-3
            alpha = max(1.0 + (alpha - 1.0) * 0.8 * ratio, 1.0 + 1e-3)
            if alpha <= 1.0 + 1e-3:
                break
    return round_down(best)


def round_down(x: float) -> float:
    """Round down to one significant digit (1.0 stays 1.0): a figure users can type."""
    if x <= 1.0:
        return 1.0
    exp = math.floor(math.log10(x))
    lead = math.floor(x / 10**exp)
    value = float(lead * 10**exp)
    return value if value > 1.0 else round(x, 2)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All singular values of ``weight`` in float64, descending (for manifests and tests)."""
    return torch.linalg.svdvals(weight.detach().to(torch.float64))


def top_singular_values(
    weight: torch.Tensor,
    count: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = POWER_ITERS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The ``count`` largest singular values (float64, descending): all of them from ``svdvals``
    (``"exact"``), or from the range finder's projected matrix (``"randomized"``, accurate to the
    power-iteration error for well-separated values)."""
    w = weight.detach().to(torch.float64)
    count = min(count, min(w.shape))
    if method == "exact" or count + oversample >= min(w.shape):
        return torch.linalg.svdvals(w)[:count]
    basis = top_subspace(
        w,
        count,
        method="randomized",
        oversample=oversample,
        power_iters=power_iters,
        generator=generator,
    )
    return torch.linalg.svdvals(basis.T @ w)[:count]

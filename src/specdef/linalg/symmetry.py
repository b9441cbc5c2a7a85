"""Tensor math of the native symmetries (no ``nn.Module``), shared by :mod:`specdef.native.apply` (in
memory) and :mod:`specdef.streaming.defend` (tensor by tensor from a checkpoint).

Every pair is given in Linear layout (weights stored out×in), float64:

- ``attention``: ``inflated`` = V (kv_heads·head_dim × d), ``bias`` = V's bias or ``None``,
  ``compensating`` = O (d_out × heads·head_dim). Query head ``q`` reads KV head ``q // (heads /
  kv_heads)`` (transformers' ``repeat_kv`` order).
- ``gated_mlp`` / ``relu_mlp``: ``inflated`` = up / W₁ (m × n), ``bias`` = its bias or ``None``,
  ``compensating`` = down / W₂ (p × m).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specdef.errors import SpecdefError
from specdef.linalg.spectral import deform_with_basis, largest_singular_value, top_subspace


@dataclass(frozen=True)
class PairTensors:
    """The three tensors a symmetry acts on (see the module docstring for shapes)."""

    inflated: torch.Tensor
    bias: torch.Tensor | None
    compensating: torch.Tensor


def _head_dim(t: PairTensors, heads: int, kv_heads: int, name: str) -> int:
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise SpecdefError(
            f"{name}: expected heads divisible by kv_heads (both ≥ 1), found {heads} and {kv_heads}."
        )
    head_dim = t.inflated.shape[0] // kv_heads
    if head_dim * kv_heads != t.inflated.shape[0] or head_dim * heads != t.compensating.shape[1]:
        raise SpecdefError(
            f"{name}: V rows {t.inflated.shape[0]} and O columns {t.compensating.shape[1]} do not "
            f"split into {kv_heads} KV heads and {heads} query heads; check the config."
        )
    return head_dim


def _heads(t: PairTensors, heads: int, kv_heads: int, name: str = "attention"):  # type: ignore[no-untyped-def]
    """Yield ``(rows of V_h, [column slices of O_q for q in h's group])`` per KV head."""
    head_dim = _head_dim(t, heads, kv_heads, name)
    groups = heads // kv_heads
    for h in range(kv_heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        cols = [
            slice(q * head_dim, (q + 1) * head_dim) for q in range(h * groups, (h + 1) * groups)
        ]
        yield rows, cols


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)


def deform_pair(
    kind: str,
    t: PairTensors,
    *,
    alpha: float,
    top_k: int,
    heads: int = 0,
    kv_heads: int = 0,
    method: str = "exact",
    generator: torch.Generator | None = None,
    name: str = "pair",
) -> PairTensors:
    """Inflate along the pair's symmetry (float64 in, float64 out); the function is unchanged."""
    w = t.inflated.to(torch.float64)
    b = None if t.bias is None else t.bias.to(torch.float64)
    if kind == "attention":
        bases = attention_bases(
            t,
            top_k=top_k,
            heads=heads,
            kv_heads=kv_heads,
            method=method,
            generator=generator,
            name=name,
        )
        return apply_attention(t, bases, alpha=alpha, heads=heads, kv_heads=kv_heads)
    if kind in ("gated_mlp", "relu_mlp"):
        return apply_diagonal(t, diagonal_scale(w, b, alpha=alpha, top_k=top_k))
    raise SpecdefError(
        f"Unknown symmetry kind {kind!r}; expected attention, gated_mlp or relu_mlp."
    )


def attention_bases(
    t: PairTensors,
    *,
    top_k: int,
    heads: int,
    kv_heads: int,
    method: str = "exact",
    generator: torch.Generator | None = None,
    name: str = "attention",
) -> list[torch.Tensor]:
    """Per KV head, an orthonormal basis (head_dim × top_k) of V_h's top-k left singular subspace."""
    head_dim = _head_dim(t, heads, kv_heads, name)
    if top_k > head_dim:
        raise SpecdefError(
            f"{name}: native attention inflates at most head_dim={head_dim} directions per "
            f"head, found top_k={top_k}; choose --top-k ≤ {head_dim}."
        )
    w = t.inflated.to(torch.float64)
    return [
        top_subspace(w[rows], top_k, method=method, generator=generator)
        for rows, _ in _heads(t, heads, kv_heads, name)
    ]


def apply_attention(
    t: PairTensors, bases: list[torch.Tensor], *, alpha: float, heads: int, kv_heads: int
) -> PairTensors:
    """``V_h → M_h·V_h``, ``b_h → M_h·b_h``, ``O_q → O_q·M_h⁻¹`` with ``M_h = I + (α−1)·U_hU_hᵀ``."""
    w = t.inflated.to(torch.float64).clone()
    b = None if t.bias is None else t.bias.to(torch.float64).clone()
    o = t.compensating.to(torch.float64).clone()
    for basis, (rows, cols) in zip(bases, _heads(t, heads, kv_heads), strict=True):
        w[rows], inverse = deform_with_basis(w[rows], alpha, basis)
        if b is not None:
            b[rows] = b[rows] + (alpha - 1.0) * (basis @ (basis.T @ b[rows]))
        for c in cols:
            o[:, c] = o[:, c] @ inverse
    return PairTensors(w, b, o)


def apply_diagonal(t: PairTensors, scale: torch.Tensor) -> PairTensors:
    """``(W₁, b₁) → D·(W₁, b₁)``, ``W₂ → W₂·D⁻¹`` for ``D = diag(scale)``."""
    w = t.inflated.to(torch.float64)
    b = None if t.bias is None else t.bias.to(torch.float64)
    o = t.compensating.to(torch.float64)
    return PairTensors(
        w * scale.unsqueeze(1), None if b is None else b * scale, o / scale.unsqueeze(0)
    )


def diagonal_scale(
    weight: torch.Tensor, bias: torch.Tensor | None, *, alpha: float, top_k: int
) -> torch.Tensor:
    """``D`` (m,) = α on the ``top_k`` rows of ``[W b]`` with the largest norms, 1 elsewhere.

    A diagonal multiplies whole rows, so each stored entry keeps its relative rounding error: unlike
    a partial subspace scaling, it loses no precision in any dtype (until overflow).
    """
    norms = torch.linalg.vector_norm(_augmented(weight, bias), dim=1)
    scale = torch.ones_like(norms)
    scale[torch.topk(norms, min(top_k, norms.numel())).indices] = alpha
    return scale


def sigma_max(weight: torch.Tensor) -> float:
    """Largest singular value (float64), without a full SVD (:func:`largest_singular_value`)."""
    return largest_singular_value(weight)


def product_error(
    kind: str,
    original: PairTensors,
    stored: PairTensors,
    *,
    heads: int = 0,
    kv_heads: int = 0,
    probe_columns: int | None = None,
) -> float:
    """Relative Frobenius error of the pair's products (``O_q·[V_h b_h]`` per query head, or
    ``W₂·[W₁ b₁]``) computed from the ``stored`` (rounded) tensors, vs the float64 ``original``.
    ``inf`` when the stored tensors are not finite (overflow). With ``probe_columns``, each product
    is applied to the same fixed Gaussian block Ω instead of formed (‖(P̃ − P)Ω‖/‖PΩ‖: an unbiased
    estimate of the squared ratio at O(m·n·probe_columns) cost, for large layers)."""
    if not all(bool(torch.isfinite(x).all()) for x in _tensors(stored)):
        return math.inf
    probe = None
    if probe_columns is not None:
        width = original.inflated.shape[1] + (0 if original.bias is None else 1)
        gen = torch.Generator().manual_seed(1234)
        probe = torch.randn(width, probe_columns, dtype=torch.float64, generator=gen)
    num = den = 0.0
    for ref, got in _products(kind, original, stored, heads, kv_heads, probe):
        num += float(torch.linalg.matrix_norm(got - ref)) ** 2
        den += float(torch.linalg.matrix_norm(ref)) ** 2
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _tensors(t: PairTensors) -> list[torch.Tensor]:
    return [t.inflated, t.compensating] + ([] if t.bias is None else [t.bias])


def _products(  # type: ignore[no-untyped-def]
    kind: str, a: PairTensors, b: PairTensors, heads: int, kv_heads: int, probe: torch.Tensor | None
):
    fa = [x.to(torch.float64) for x in (a.inflated, a.compensating)]
    fb = [x.to(torch.float64) for x in (b.inflated, b.compensating)]
    ba = None if a.bias is None else a.bias.to(torch.float64)
    bb = None if b.bias is None else b.bias.to(torch.float64)
    va, vb = _augmented(fa[0], ba), _augmented(fb[0], bb)
    if probe is not None:
        va, vb = va @ probe, vb @ probe
    if kind == "attention":
        for rows, cols in _heads(a, heads, kv_heads):
            for c in cols:
                yield fa[1][:, c] @ va[rows], fb[1][:, c] @ vb[rows]
    else:
        yield fa[1] @ va, fb[1] @ vb


def _balancers(kind: str, t: PairTensors, heads: int, kv_heads: int) -> list[torch.Tensor]:
    """Balancing transforms: per KV head an SPD ``N`` (head_dim²) with ``N·A·N = N⁻¹·B·N⁻¹``, or
    one diagonal vector ``d`` for MLP pairs."""
    w = t.inflated.to(torch.float64)
    b = None if t.bias is None else t.bias.to(torch.float64)
    o = t.compensating.to(torch.float64)
    aug = _augmented(w, b)
    if kind != "attention":
        rows = torch.linalg.vector_norm(aug, dim=1)
        cols = torch.linalg.vector_norm(o, dim=0)
        ok = (rows > 0) & (cols > 0)
        ratio = torch.where(ok, cols / torch.where(ok, rows, 1.0), 1.0)
        return [ratio.sqrt()]
    out = []
    for rows_h, cols in _heads(t, heads, kv_heads):
        gram_v = aug[rows_h] @ aug[rows_h].T
        gram_o = sum((o[:, c].T @ o[:, c] for c in cols), torch.zeros_like(gram_v))
        out.append(_sqrt_spd(_geometric_mean(_inverse_spd(gram_v), gram_o)))
    return out


def _eig_fn(a: torch.Tensor, fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    a = 0.5 * (a + a.T)
    vals, vecs = torch.linalg.eigh(a)
    floor = max(float(vals.abs().max()), 1e-300) * 1e-15  # rank-deficient Gram: a relative ridge
    return (vecs * fn(vals.clamp_min(floor))) @ vecs.T


def _sqrt_spd(a: torch.Tensor) -> torch.Tensor:
    return _eig_fn(a, torch.sqrt)


def _inverse_spd(a: torch.Tensor) -> torch.Tensor:
    return _eig_fn(a, torch.reciprocal)


def _geometric_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A # B = A^{1/2}(A^{-1/2} B A^{-1/2})^{1/2}A^{1/2}``: the SPD solution of ``X·A⁻¹·X = B``."""
    root = _sqrt_spd(a)
    inv_root = _eig_fn(a, lambda v: 1.0 / torch.sqrt(v))
    return root @ _sqrt_spd(inv_root @ b @ inv_root) @ root


def imbalance(kind: str, t: PairTensors, *, heads: int = 0, kv_heads: int = 0) -> float:
    """log10 of the largest factor the balancing transform applies (0 for a balanced pair)."""
    worst = 0.0
    for n in _balancers(kind, t, heads, kv_heads):
        vals = torch.linalg.eigvalsh(0.5 * (n + n.T)) if n.dim() == 2 else n
        worst = max(worst, float(vals.log10().abs().max()))
    return worst


def balance_pair(kind: str, t: PairTensors, *, heads: int = 0, kv_heads: int = 0) -> PairTensors:
    """The balanced representative of the pair (same function, no extra parameters)."""
    w = t.inflated.to(torch.float64).clone()
    b = None if t.bias is None else t.bias.to(torch.float64).clone()
    o = t.compensating.to(torch.float64).clone()
    balancers = _balancers(kind, t, heads, kv_heads)
    if kind != "attention":
        d = balancers[0]
        return PairTensors(w * d.unsqueeze(1), None if b is None else b * d, o / d.unsqueeze(0))
    for n, (rows, cols) in zip(balancers, _heads(t, heads, kv_heads), strict=True):
        n_inv = _inverse_spd(n)
        w[rows] = n @ w[rows]
        if b is not None:
            b[rows] = n @ b[rows]
        for c in cols:
            o[:, c] = o[:, c] @ n_inv
    return PairTensors(w, b, o)

"""Certified lower bounds on σ₁(H) for a SpecDef-defended model: the curvature toolkit
(:mod:`specdef.curvature`, pure math) applied to the defended pairs that :mod:`specdef.defense.apply`
finds. See ``docs/theory.md`` for the derivation.

* :func:`spectral_lower_bound` — the weight-spectrum bound ``max_pairs max_i σ_i(W̃)²·κ_i``.
* :func:`defense_certificate` — Rayleigh quotients / Ritz value of full-model Hessian-vector
  products on rank-1 directions ``ũ_j ũ_iᵀ`` (and, if given, ``a_i ũ_iᵀ``) in compensation weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from specdef.curvature.certificates import (
    Certificate,
    SpectralBound,
    compensation_directions,
    pair_spectral_bound,
    rayleigh_certificate,
)
from specdef.curvature.estimators import lanczos
from specdef.curvature.hvp import HessianOperator, LossFn
from specdef.curvature.lr import lr_ceiling
from specdef.defense.layer import DefendedLinear, defended_layers, parameter_roles
from specdef.errors import SpecdefError, did_you_mean
from specdef.utils.devices import to_device
from specdef.utils.progress import track


@dataclass(frozen=True)
class PairBound:
    name: str
    sigma_inflated: float  # σ₁(W̃)
    bound: SpectralBound


@dataclass(frozen=True)
class DefenseBound:
    """The weight-spectrum bound over the chosen pairs (``value`` = the best one)."""

    value: float
    pairs: tuple[PairBound, ...]
    products: int  # activation-space Hessian-vector products


def _require_pairs(model: nn.Module) -> dict[str, DefendedLinear]:
    layers = defended_layers(model)
    if not layers:
        raise SpecdefError(
            "The model has no defended layers; the SpecDef bounds need a defended model "
            "(specdef defend …, or --alpha on specdef curvature)."
        )
    return layers


def strongest_pairs(model: nn.Module, max_pairs: int | None = None) -> list[str]:
    """Names of defended layers ordered by σ₁ of their inflated weight, largest first."""
    layers = _require_pairs(model)
    sigma = {
        n: float(torch.linalg.matrix_norm(m.inflated.weight.detach().double(), ord=2))
        for n, m in layers.items()
    }
    names = sorted(layers, key=lambda n: -sigma[n])
    return names if max_pairs is None else names[:max_pairs]


def spectral_lower_bound(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    top: int = 1,
    pairs: Sequence[str] | None = None,
    max_pairs: int | None = None,
    max_iter: int = 30,
) -> DefenseBound:
    """``σ₁(H) ≥ max over pairs, i < top of σ_i(W̃)²·κ_i`` (see :func:`pair_spectral_bound`).

    ``pairs`` names defended layers; default: all, or the ``max_pairs`` with the largest σ₁(W̃).
    """
    layers = _require_pairs(model)
    names = list(pairs) if pairs is not None else strongest_pairs(model, max_pairs)
    results = []
    for name in names:
        if name not in layers:
            raise SpecdefError(did_you_mean(name, layers, what="defended layer"))
        layer = layers[name]
        bound = pair_spectral_bound(
            model, loss_fn, batches, layer.inflated, layer.compensation, top=top, max_iter=max_iter
        )
        results.append(PairBound(name, bound.sigmas[0], bound))
    return DefenseBound(
        value=max(p.bound.value for p in results),
        pairs=tuple(results),
        products=sum(p.bound.products for p in results),
    )


def defense_certificate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    top: int = 1,
    pairs: Sequence[str] | None = None,
    max_pairs: int | None = 4,
    spectral: DefenseBound | None = None,
) -> Certificate:
    """Ritz / Rayleigh certificate from ``top²`` directions per pair in the compensation weights.

    Products are taken with the Hessian block of the chosen compensation weights (a principal
    block, so by Poincaré separation its Rayleigh quotients bound σ₁ of the full Hessian and equal
    the full Hessian's for these directions). With ``spectral`` (from :func:`spectral_lower_bound`)
    its optimal directions ``a_i ũ_iᵀ`` are added.
    """
    layers = _require_pairs(model)
    names = list(pairs) if pairs is not None else strongest_pairs(model, max_pairs)
    extra = {p.name: p.bound for p in spectral.pairs} if spectral is not None else {}
    rows = [f"{n}.compensation.weight" for n in names]
    op = HessianOperator(model, loss_fn, batches, rows=rows)
    offsets, start = {}, 0
    for pname, p in op.rows:  # the operator's layout is module order, not ``names`` order
        offsets[pname] = start
        start += p.numel()
    directions, labels = [], []
    for name in names:
        offset = offsets[f"{name}.compensation.weight"]
        size = layers[name].compensation.weight.numel()
        weight = layers[name].inflated.weight
        local, local_labels = compensation_directions(weight, top)
        if name in extra:
            b = extra[name]
            for i, (a, u) in enumerate(zip(b.output_directions, b.input_directions, strict=False)):
                local.append(torch.outer(a, u))
                local_labels.append(f"a{i}·u{i}ᵀ")
        for d, label in zip(local, local_labels, strict=True):
            flat = torch.zeros(op.shape[0], dtype=torch.float64)
            flat[offset : offset + size] = d.reshape(-1)
            directions.append(flat)
            labels.append(f"{name}: {label}")
    return rayleigh_certificate(op, directions, labels)


BLOCKS = ("all", "compensation", "inflated", "untouched")


def block_names(model: nn.Module, block: str) -> list[str] | None:
    """Parameter names of a ``--block`` choice (``None`` = every trainable parameter)."""
    if block not in BLOCKS:
        raise SpecdefError(did_you_mean(block, BLOCKS, what="block"))
    if block == "all":
        return None

    names = [n for n, role in parameter_roles(model).items() if role == block]
    if not names:
        raise SpecdefError(
            f"The model has no {block!r} parameters (is it defended?); use --block all, or "
            "measure a defended checkpoint / pass --alpha."
        )
    return names


class _Ticking:
    """Forward ``matvec`` to an operator and advance a progress bar once per product."""

    def __init__(self, op: HessianOperator, budget: int, description: str) -> None:

        self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device
        self._ticks = iter(track(range(budget), description, total=budget))

    @property
    def hvps(self) -> int:
        return self.op.hvps

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        next(self._ticks, None)
        return self.op.matvec(vector)

    def close(self) -> None:
        for _ in self._ticks:
            pass


def measure_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    block: str = "all",
    top: int = 1,
    max_hvps: int = 20,
    tol: float = 1e-3,
    bounds: bool = True,
    max_pairs: int = 4,
    bound_iters: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    """Top eigenvalues of the Hessian block by Lanczos, the GD learning-rate ceiling, and — for a
    defended model — the weight-spectrum bound and the Rayleigh certificate. A JSON-ready dict.
    ``batches`` are moved to the model's device."""

    device = next(model.parameters()).device
    batches = [to_device(b, device) for b in batches]
    names = block_names(model, block)
    op = HessianOperator(model, loss_fn, batches, rows=names)
    ticking = _Ticking(op, max_hvps, f"Lanczos on {block} ({op.shape[0]:,} parameters)")
    try:
        res = lanczos(ticking, k=top, which="LA", max_iter=max_hvps, tol=tol, seed=seed)
    finally:
        ticking.close()
    out: dict[str, Any] = {
        "block": block,
        "parameters": op.shape[0],
        "batches": len(batches),
        "eigenvalues": list(res.eigenvalues),
        "residuals": list(res.residuals),
        "converged": res.converged,
        "hvps": res.hvps,
        "history": list(res.history),
        "lr_ceiling": lr_ceiling(res.eigenvalues[0]),
        "dtype": str(op.dtype).removeprefix("torch."),
    }
    if bounds and defended_layers(model):
        spectral = spectral_lower_bound(
            model, loss_fn, batches, max_pairs=max_pairs, max_iter=bound_iters
        )
        cert = defense_certificate(model, loss_fn, batches, max_pairs=max_pairs, spectral=spectral)
        out["spectral_bound"] = {
            "value": spectral.value,
            "activation_products": spectral.products,
            "pairs": [
                {
                    "name": p.name,
                    "sigma_inflated": p.sigma_inflated,
                    "kappa": p.bound.kappas[0],
                    "bound": p.bound.value,
                }
                for p in spectral.pairs
            ],
        }
        out["certificate"] = {"value": cert.value, "ritz": cert.ritz, "hvps": cert.hvps}
    return out

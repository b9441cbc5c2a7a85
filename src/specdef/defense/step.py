"""Algorithm 1 on one layer: the step every defend path runs — in memory
(:func:`specdef.defense.apply.apply_specdef_`) and tensor by tensor
(:mod:`specdef.streaming.defend`) — so both write the same bits and the same report row.

:func:`defend_layer` takes a weight ``W`` (m×n, Linear form, in its stored dtype) and returns
``W̃ = T·W`` and ``C = T⁻¹`` rounded to that dtype, the top-k basis and a :class:`LayerReport`.
Its random draws come from a generator seeded by :func:`layer_seed` (the run's seed and the
layer's name), so the result does not depend on the order layers are visited, on which layers
are selected beside it, or on whether an interrupted streaming run was resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from specdef.defense import guard
from specdef.defense.config import SpecDefConfig
from specdef.linalg import spectral

# singular values reported per layer beyond the top k (σ_{k+1} … shows the untouched spectrum)
EXTRA_SIGMAS = 5


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for ``name``'s random draws, independent of the order layers are visited."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded with :func:`layer_seed` (what every defend path draws from)."""
    return torch.Generator().manual_seed(layer_seed(seed, name))


@dataclass(frozen=True)
class LayerReport:
    """What happened to one layer (a row of the manifest)."""

    name: str
    source: str  # "linear" or "conv1d"
    shape: tuple[int, int]  # (m, n) in the Linear form
    dtype: str
    bias: bool
    sigma_before: tuple[float, ...]  # top min(k + 5, rank) singular values of W
    sigma_after: tuple[float, ...]  # same count, of W̃ (spectral.deformed_spectrum)
    fro_before: float
    fro_after: float  # of the stored W̃, accumulated in float32 (_stored_norm)
    reconstruction_error: float  # ‖C·W̃ − W‖/‖W‖ in ``dtype`` (probe estimate, see spectral)
    output_gap: float | None  # relative layer-output gap on the probe batch, in ``dtype``
    tolerance: float
    params_before: int
    params_after: int

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out["sigma_before"] = list(self.sigma_before)
        out["sigma_after"] = list(self.sigma_after)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        """The report back from :meth:`to_dict` (as stored in a manifest or a shard record)."""
        tuples = ("shape", "sigma_before", "sigma_after")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})  # type: ignore[arg-type]

    @property
    def over_tolerance(self) -> bool:
        """True when either measured error exceeds the tolerance (the guard's rule)."""
        ratio = guard.over_tolerance_ratio(
            self.reconstruction_error, self.output_gap, self.tolerance
        )
        return ratio > 1.0


@dataclass(frozen=True)
class LayerStep:
    """The result of :func:`defend_layer`: the tensors to store and what to report."""

    inflated: torch.Tensor  # W̃ (m×n), in the weight's dtype
    compensation: torch.Tensor  # C (m×m), in the weight's dtype
    basis: torch.Tensor  # U_k (m×k), float64: the guard's safe-alpha search reuses it
    report: LayerReport


def _stored_norm(tensor: torch.Tensor) -> float:
    """‖tensor‖_F of a stored (rounded) tensor, accumulated in float32 — or float64 for a float64
    one. A report figure, not a guard input: relative accuracy ≈1e-7 (torch's cascaded sum), and
    ≈8× faster than a float64 accumulation of a float32 tensor, which converts every entry
    (≈5 % of defending SmolLM2 before)."""
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return float(torch.linalg.vector_norm(tensor, dtype=wide))


@torch.no_grad()
def defend_layer(
    name: str,
    weight: torch.Tensor,
    config: SpecDefConfig,
    *,
    bias: bool,
    source: str = "linear",
) -> LayerStep:
    """Algorithm 1 on layer ``name``: ``weight`` W (m×n, Linear form, stored dtype). ``bias``: the
    layer has one (counted in the report; its values move unchanged to the compensation layer, so
    the step never reads them — streaming holds one tensor at a time).

    Computed in float64 and rounded to W's dtype once. The report holds the top min(k + 5, rank)
    singular values of W and of W̃, both from the factorisation that gave the basis
    (:func:`specdef.linalg.spectral.deformed_spectrum`: no second decomposition), the
    reconstruction error of the stored pair in W's dtype, estimated with a Gaussian probe
    (:func:`specdef.linalg.spectral.probe_reconstruction_error`) and the tolerance for that dtype; the
    output gap is left None for the caller that has a probe batch. Refusing above the tolerance
    is the caller's decision (:func:`specdef.defense.guard.layer_refusal`).
    """
    guard.check_layer(name, weight, None, top_k=config.top_k)
    dtype = weight.dtype
    m, n = weight.shape
    generator = layer_generator(config.seed, name)
    weight64 = weight.detach().to(torch.float64)  # cast once for every spectral call below
    basis, sigma = spectral.top_subspace_and_values(
        weight64, config.top_k, method=config.method, generator=generator
    )
    # float64 products rounded to W's dtype block by block (no float64 m×m temporary)
    inflated, compensation = spectral.deform_with_basis(weight64, config.alpha, basis, dtype=dtype)
    # the stored pair's error on a fixed Gaussian probe: O((mn + m²)p), not the 2m²n product
    error = spectral.probe_reconstruction_error(weight64, inflated, compensation, dtype=dtype)
    count = min(config.top_k + EXTRA_SIGMAS, len(sigma))
    # W̃'s spectrum from the basis: the top k times α, the rest unchanged (no second factorisation)
    sigma_after = spectral.deformed_spectrum(sigma, config.alpha, config.top_k)[:count]
    bias_params = m if bias else 0
    report = LayerReport(
        name=name, source=source, shape=(m, n), dtype=str(dtype).removeprefix("torch."),
        bias=bias, sigma_before=tuple(sigma[:count].tolist()),
        sigma_after=tuple(sigma_after.tolist()),
        fro_before=float(torch.linalg.matrix_norm(weight64)),
        fro_after=_stored_norm(inflated),
        reconstruction_error=error, output_gap=None, tolerance=config.tolerance_for(dtype),
        params_before=m * n + bias_params, params_after=m * n + m * m + bias_params,
    )  # fmt: skip
    return LayerStep(inflated, compensation, basis, report)

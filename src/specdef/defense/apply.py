"""SpecDef Algorithm 1 on a live model: apply (with a precision guard) and undo.

The config is :mod:`specdef.defense.config`, the defended-layer module :mod:`specdef.defense.layer`.

``apply_specdef_(model, config)`` replaces each selected layer ``W`` (m×n) by a
:class:`DefendedLinear`: an ``inflated`` ``nn.Linear`` with weight ``W̃ = T·W`` (no bias) followed
by a ``compensation`` ``nn.Linear`` with weight ``C = T⁻¹`` (m×m) that carries the original bias.
The function is unchanged (``C·W̃ = W``) up to rounding in the model's dtype, which the precision
guard measures and bounds. ``undo_specdef_`` fuses every pair back into one layer — also the
informed attacker's "fuse". The math lives in :mod:`specdef.linalg.spectral`; the default tolerances,
the checks before defending and the guard's refusals in :mod:`specdef.defense.guard`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from specdef.defense import guard
from specdef.defense import probe as probing
from specdef.defense.config import SpecDefConfig
from specdef.defense.cost import InferenceCost
from specdef.defense.layer import (
    DefendedLinear,
    count_parameters,
    defended_layers,
    linear_form,
    set_submodule,
)
from specdef.defense.targets import select_targets
from specdef.linalg import spectral
from specdef.utils.progress import track

log = logging.getLogger(__name__)


def undo_specdef_(model: nn.Module) -> list[str]:
    """Fuse every defended pair back into one layer in place (W = C·W̃, computed in float64).

    Returns the names fused. This is the exact inverse of :func:`apply_specdef_` up to rounding of
    the fused weight into the layer's dtype — and the informed attacker's "fuse" transform.
    """
    names = list(defended_layers(model))
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, DefendedLinear)
        set_submodule(model, name, layer.fuse())
    if hasattr(model, "specdef_report"):
        del model.specdef_report
    return names


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
    fro_after: float
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


@dataclass(frozen=True)
class DefenseReport:
    """The result of :func:`apply_specdef_`; :mod:`specdef.io.checkpoint` writes it as the manifest."""

    config: SpecDefConfig
    layers: tuple[LayerReport, ...]
    params_before: int
    params_after: int
    model_output_gap: float | None  # relative gap of the model output on the probe batch
    forced: bool  # True when force=True let a layer above tolerance through
    over_tolerance: tuple[str, ...]  # layers above tolerance (non-empty only when forced)
    inference_cost: InferenceCost | None = None  # measured by the defend workflow (release.defend)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "model_output_gap": self.model_output_gap,
            "forced": self.forced,
            "over_tolerance": list(self.over_tolerance),
            "inference_cost": None
            if self.inference_cost is None
            else self.inference_cost.to_dict(),
        }

    @property
    def max_reconstruction_error(self) -> float:
        return max((layer.reconstruction_error for layer in self.layers), default=0.0)


@torch.no_grad()
def apply_specdef_(
    model: nn.Module, config: SpecDefConfig, *, probe: Any | None = None
) -> DefenseReport:
    """Defend ``model`` in place and return the report (also stored as ``model.specdef_report``).

    Every selected layer is deformed in float64 and cast back to its dtype. The precision guard
    measures, in that dtype, each layer's reconstruction error and — when a ``probe`` batch is
    given — each layer's output gap and the model's output gap; above the tolerance it raises
    :class:`SpecdefError` (naming the layer, the error, the tolerance and the largest alpha that
    fits) and leaves ``model`` unchanged, unless ``config.force``.
    """

    names = select_targets(
        model, config.targets, exclude=config.exclude, n_random=config.n_random, seed=config.seed
    )
    guard.check_untied(model, names)
    for name in names:
        weight, bias, _ = linear_form(model.get_submodule(name))
        guard.check_layer(name, weight, bias, top_k=config.top_k)
    inputs = probing.capture_inputs(model, names, probe) if probe is not None else {}
    reference = probing.model_output(model, probe) if probe is not None else None
    gen = torch.Generator().manual_seed(config.seed)
    params_before = count_parameters(model)
    built: list[tuple[str, DefendedLinear, LayerReport, torch.Tensor]] = []
    for name in track(names, "defending", total=len(names)):
        module = model.get_submodule(name)
        weight, bias, source = linear_form(module)
        dtype, device = weight.dtype, weight.device
        m, n = weight.shape
        weight64 = weight.detach().to(torch.float64)  # cast once for the spectral calls below
        basis, sigma = spectral.top_subspace_and_values(
            weight64, config.top_k, method=config.method, generator=gen
        )
        inflated, compensation = spectral.deform_with_basis(weight64, config.alpha, basis)
        layer = DefendedLinear(
            n, m, bias=bias is not None, alpha=config.alpha, top_k=config.top_k, source=source,
            dtype=dtype, device=device,
        )  # fmt: skip
        layer.inflated.weight.copy_(inflated)
        layer.compensation.weight.copy_(compensation)
        if bias is not None:
            layer.compensation.bias.copy_(bias)
        error = spectral.probe_reconstruction_error(
            weight64, layer.inflated.weight, layer.compensation.weight, dtype=dtype
        )
        gap = None
        if name in inputs:
            gap = probing.relative_gap(layer(inputs[name]), module(inputs[name]))
        count = min(config.top_k + 5, len(sigma))
        sigma_b = sigma[:count]
        sigma_a = spectral.deformed_spectrum(sigma, config.alpha, config.top_k)[:count]
        report = LayerReport(
            name=name, source=source, shape=(m, n), dtype=str(dtype).removeprefix("torch."),
            bias=bias is not None, sigma_before=tuple(sigma_b.tolist()),
            sigma_after=tuple(sigma_a.tolist()),
            fro_before=float(torch.linalg.matrix_norm(weight64)),
            fro_after=float(torch.linalg.vector_norm(layer.inflated.weight, dtype=torch.float64)),
            reconstruction_error=error, output_gap=gap, tolerance=config.tolerance_for(dtype),
            params_before=sum(p.numel() for p in module.parameters()),
            params_after=sum(p.numel() for p in layer.parameters()),
        )  # fmt: skip
        built.append((name, layer, report, basis))
        log.info("defended %s (%d×%d): reconstruction error %.3g", name, m, n, error)

    def worst_ratio(item: tuple[str, DefendedLinear, LayerReport, torch.Tensor]) -> float:
        rep = item[2]
        return guard.over_tolerance_ratio(rep.reconstruction_error, rep.output_gap, rep.tolerance)

    over = [item for item in built if worst_ratio(item) > 1.0]
    if over and not config.force:
        name, _, rep, basis = max(over, key=worst_ratio)
        raise guard.layer_refusal(
            name,
            linear_form(model.get_submodule(name))[0],
            basis,
            reconstruction_error=rep.reconstruction_error,
            output_gap=rep.output_gap,
            tolerance=rep.tolerance,
            alpha=config.alpha,
        )

    originals = {name: model.get_submodule(name) for name, *_ in built}
    for name, layer, _, _ in built:
        set_submodule(model, name, layer)
    model_gap = None
    if probe is not None and reference is not None:
        model_gap = probing.relative_gap(probing.model_output(model, probe), reference)
        tol = config.tolerance_for(reference.dtype)
        if model_gap > tol and not config.force:
            for name, original in originals.items():
                set_submodule(model, name, original)
            worst = max(built, key=worst_ratio)
            raise guard.model_gap_refusal(
                model_gap,
                tolerance=tol,
                dtype=reference.dtype,
                alpha=config.alpha,
                worst_layer=worst[0],
                worst_error=worst[2].reconstruction_error,
            )
    forced = bool(over) or (model_gap is not None and reference is not None
                            and model_gap > config.tolerance_for(reference.dtype))  # fmt: skip
    report_all = DefenseReport(
        config=config,
        layers=tuple(rep for _, _, rep, _ in built),
        params_before=params_before,
        params_after=count_parameters(model),
        model_output_gap=model_gap,
        forced=forced,
        over_tolerance=tuple(name for name, *_ in over),
    )
    if forced:
        over_names = report_all.over_tolerance
        log.warning(
            "precision guard overridden (force=True): %d layer(s) over tolerance%s",
            len(over_names),
            f" (first: {over_names[0]})" if over_names else " (model output gap)",
        )
    setattr(model, "specdef_report", report_all)  # noqa: B010 - plain attribute, not a Module
    return report_all

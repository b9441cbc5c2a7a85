"""SpecDef Algorithm 1 on a live model: apply (with a precision guard) and undo.

The config is :mod:`specdef.defense.config`, the defended-layer module :mod:`specdef.defense.layer`.

``apply_specdef_(model, config)`` replaces each selected layer ``W`` (m×n) by a
:class:`DefendedLinear`: an ``inflated`` ``nn.Linear`` with weight ``W̃ = T·W`` (no bias) followed
by a ``compensation`` ``nn.Linear`` with weight ``C = T⁻¹`` (m×m) that carries the original bias.
The function is unchanged (``C·W̃ = W``) up to rounding in the model's dtype, which the precision
guard measures and bounds. ``undo_specdef_`` fuses every pair back into one layer — also the
informed attacker's "fuse". The per-layer step (shared with streaming) is
:func:`specdef.defense.step.defend_layer`, its math :mod:`specdef.linalg.spectral`; the default
tolerances, the checks before defending and the guard's refusals :mod:`specdef.defense.guard`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
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
from specdef.defense.step import LayerReport, LayerStep, defend_layer
from specdef.defense.targets import select_targets
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

    @classmethod
    def summarize(
        cls,
        config: SpecDefConfig,
        layers: Sequence[LayerReport],
        *,
        params_before: int,
        params_after: int,
        model_output_gap: float | None = None,
        model_tolerance: float | None = None,
    ) -> DefenseReport:
        """The report of a finished run (in memory or streaming: one ``forced`` rule). A layer is
        over tolerance when its reconstruction error *or* its probe output gap exceeds its
        tolerance; the run is ``forced`` when a layer is, or when the model's probe output gap
        exceeds ``model_tolerance`` — both only reachable with ``config.force``."""
        over = tuple(layer.name for layer in layers if layer.over_tolerance)
        model_over = (
            model_output_gap is not None
            and model_tolerance is not None
            and model_output_gap > model_tolerance
        )
        return cls(
            config=config, layers=tuple(layers), params_before=params_before,
            params_after=params_after, model_output_gap=model_output_gap,
            forced=bool(over) or model_over, over_tolerance=over,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DefenseReport:
        """The report back from :meth:`to_dict` (as stored in a manifest)."""
        return cls(
            config=SpecDefConfig.from_dict(data["config"]),
            layers=tuple(LayerReport.from_dict(layer) for layer in data["layers"]),
            params_before=int(data["params_before"]), params_after=int(data["params_after"]),
            model_output_gap=data.get("model_output_gap"), forced=bool(data["forced"]),
            over_tolerance=tuple(data.get("over_tolerance", ())),
            inference_cost=InferenceCost.from_dict(data["inference_cost"])
            if data.get("inference_cost") else None,
        )  # fmt: skip


@torch.no_grad()
def apply_specdef_(
    model: nn.Module, config: SpecDefConfig, *, probe: Any | None = None
) -> DefenseReport:
    """Defend ``model`` in place and return the report (also stored as ``model.specdef_report``).

    Every selected layer is deformed in float64 and cast back to its dtype. The precision guard
    measures, in that dtype, each layer's reconstruction error and — when a ``probe`` batch is
    given — each layer's output gap and the model's output gap. The undefended model runs once
    (the reference output); the defended model runs once (:func:`specdef.defense.probe.layer_gaps`),
    and each defended layer's output there is compared with the original layer's on the same
    input. Above the tolerance it raises :class:`SpecdefError` (naming the layer, the error, the
    tolerance and the largest alpha that fits) and leaves ``model`` unchanged, unless
    ``config.force``.
    """

    names = select_targets(
        model, config.targets, exclude=config.exclude, n_random=config.n_random, seed=config.seed
    )
    guard.check_untied(model, names)
    for name in names:
        weight, bias, _ = linear_form(model.get_submodule(name))
        guard.check_layer(name, weight, bias, top_k=config.top_k)
    reference = probing.model_output(model, probe) if probe is not None else None
    params_before = count_parameters(model)
    built: list[tuple[str, DefendedLinear, LayerStep]] = []
    for name in track(names, "defending", total=len(names)):
        weight, bias, source = linear_form(model.get_submodule(name))
        m, n = weight.shape
        step = defend_layer(name, weight, config, bias=bias is not None, source=source)
        layer = DefendedLinear.from_weights(
            step.inflated, step.compensation, bias, alpha=config.alpha, top_k=config.top_k,
            source=source,
        )  # fmt: skip
        built.append((name, layer, step))
        log.info(
            "defended %s (%d×%d): reconstruction error %.3g",
            name, m, n, step.report.reconstruction_error,
        )  # fmt: skip

    originals = {name: model.get_submodule(name) for name, *_ in built}

    def restore() -> None:
        for name, original in originals.items():
            set_submodule(model, name, original)

    for name, layer, _ in built:
        set_submodule(model, name, layer)
    model_gap: float | None = None
    model_tol: float | None = None
    if probe is not None and reference is not None:
        # one defended forward for both checks: each layer against the original on its input there
        try:
            output, gaps = probing.layer_gaps(model, originals, probe)
        except BaseException:
            restore()
            raise
        built = [
            (name, layer, step)
            if name not in gaps
            else (name, layer, dataclasses.replace(
                step, report=dataclasses.replace(step.report, output_gap=gaps[name])))
            for name, layer, step in built
        ]  # fmt: skip
        model_gap = probing.relative_gap(output, reference)
        model_tol = config.tolerance_for(reference.dtype)

    def worst_ratio(item: tuple[str, DefendedLinear, LayerStep]) -> float:
        rep = item[2].report
        return guard.over_tolerance_ratio(rep.reconstruction_error, rep.output_gap, rep.tolerance)

    over = [item for item in built if item[2].report.over_tolerance]
    if over and not config.force:
        restore()
        name, _, step = max(over, key=worst_ratio)
        raise guard.layer_refusal(
            name,
            linear_form(originals[name])[0],
            step.basis,
            reconstruction_error=step.report.reconstruction_error,
            output_gap=step.report.output_gap,
            tolerance=step.report.tolerance,
            alpha=config.alpha,
        )
    if (
        model_gap is not None
        and model_tol is not None
        and reference is not None
        and model_gap > model_tol
        and not config.force
    ):
        restore()
        worst = max(built, key=worst_ratio)
        raise guard.model_gap_refusal(
            model_gap,
            tolerance=model_tol,
            dtype=reference.dtype,
            alpha=config.alpha,
            worst_layer=worst[0],
            worst_error=worst[2].report.reconstruction_error,
        )
    report_all = DefenseReport.summarize(
        config,
        [step.report for _, _, step in built],
        params_before=params_before,
        params_after=count_parameters(model),
        model_output_gap=model_gap,
        model_tolerance=model_tol,
    )
    if report_all.forced:
        over_names = report_all.over_tolerance
        log.warning(
            "precision guard overridden (force=True): %d layer(s) over tolerance%s",
            len(over_names),
            f" (first: {over_names[0]})" if over_names else " (model output gap)",
        )
    setattr(model, "specdef_report", report_all)  # noqa: B010 - plain attribute, not a Module
    return report_all

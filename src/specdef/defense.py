"""SpecDef on a model: config, the defended-layer module, apply (with a precision guard) and undo.

``apply_specdef_(model, config)`` replaces each selected layer ``W`` (m×n) by a
:class:`DefendedLinear`: an ``inflated`` ``nn.Linear`` with weight ``W̃ = T·W`` (no bias) followed
by a ``compensation`` ``nn.Linear`` with weight ``C = T⁻¹`` (m×m) that carries the original bias.
The function is unchanged (``C·W̃ = W``) up to rounding in the model's dtype, which the precision
guard measures and bounds. ``undo_specdef_`` fuses every pair back into one layer — also the
informed attacker's "fuse". The math lives in :mod:`specdef.spectral`; the default tolerances,
the checks before defending and the guard's refusals in :mod:`specdef._precision_guard`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from specdef import _precision_guard as guard
from specdef import spectral
from specdef._precision_guard import DEFAULT_TOLERANCE as DEFAULT_TOLERANCE  # public path
from specdef.errors import SpecdefError
from specdef.progress import track
from specdef.targets import linear_kinds, select_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecDefConfig:
    """What to defend and how.

    alpha: factor (> 1) applied to the top-k singular values of each selected weight.
    top_k: number of singular values inflated per layer (1 ≤ top_k ≤ min(m, n) of every layer).
    targets: layer selection (names/suffixes, regex, ``"all-linear"``, ``"preset:NAME"``); see
        :mod:`specdef.targets`.
    exclude: layers removed from the selection (names/suffixes tuple, or a regex string).
    method: ``"exact"`` (full SVD) or ``"randomized"`` (range finder, O(m·n·k)); both keep C·W̃ = W.
    seed: seeds the randomized sketch and the ``n_random`` draw.
    tolerance: precision-guard bound; None = :data:`DEFAULT_TOLERANCE` for the layer's dtype.
    force: defend even above the tolerance (recorded in the report).
    n_random: defend only this many of the matched layers, drawn with ``seed``.
    """

    alpha: float
    top_k: int
    targets: str | tuple[str, ...] = "all-linear"
    exclude: str | tuple[str, ...] = ()
    method: str = "exact"
    seed: int = 0
    tolerance: float | None = None
    force: bool = False
    n_random: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise SpecdefError(f"alpha must be a number > 1, found {self.alpha!r}.")
        if not math.isfinite(self.alpha) or self.alpha <= 1:
            raise SpecdefError(
                f"alpha must be a finite number > 1 (the inflation factor), found {self.alpha}; "
                "e.g. --alpha 1e4."
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise SpecdefError(
                f"top_k must be an integer ≥ 1, found {self.top_k!r}; e.g. --top-k 25."
            )
        if self.method not in spectral.METHODS:
            raise SpecdefError(
                f"method must be one of {', '.join(spectral.METHODS)}, found {self.method!r}."
            )
        if self.tolerance is not None and not (
            self.tolerance > 0 and math.isfinite(self.tolerance)
        ):
            raise SpecdefError(f"tolerance must be a positive number, found {self.tolerance}.")
        if self.n_random is not None and self.n_random < 1:
            raise SpecdefError(f"n_random must be ≥ 1, found {self.n_random}.")
        for fname in ("targets", "exclude"):
            value = getattr(self, fname)
            if not isinstance(value, str):
                object.__setattr__(self, fname, tuple(value))

    def tolerance_for(self, dtype: torch.dtype) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return guard.default_tolerance(dtype)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for fname in ("targets", "exclude"):
            if isinstance(out[fname], tuple):
                out[fname] = list(out[fname])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpecDefConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for fname in ("targets", "exclude"):
            if isinstance(kwargs.get(fname), list):
                kwargs[fname] = tuple(kwargs[fname])
        return cls(**kwargs)


class DefendedLinear(nn.Module):
    """``forward(x) = compensation(inflated(x))``: an m×n ``inflated`` layer (W̃ = T·W, no bias)
    followed by an m×m ``compensation`` layer (C = T⁻¹, original bias). Both are stock
    ``nn.Linear`` so optimizers, peft and hooks see ordinary layers.

    ``source`` records what was replaced (``"linear"`` or ``"conv1d"``), so the undo restores it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        alpha: float,
        top_k: int,
        source: str = "linear",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.inflated = nn.Linear(in_features, out_features, bias=False, **factory)
        self.compensation = nn.Linear(out_features, out_features, bias=bias, **factory)
        self.alpha = float(alpha)
        self.top_k = int(top_k)
        self.source = source

    @classmethod
    def identity_slot(cls, layer: nn.Linear, *, top_k: int) -> DefendedLinear:
        """Algorithm 1's slot before any inflation (α = 1): W̃ = W and C = I, the layer's bias on
        C — the same function and structure as a defended layer, the undefended curvature."""
        m, n = layer.weight.shape
        ref = layer.weight
        out = cls(n, m, bias=layer.bias is not None, alpha=1.0, top_k=top_k, dtype=ref.dtype,
                  device=ref.device)  # fmt: skip
        with torch.no_grad():
            out.inflated.weight.copy_(layer.weight)
            out.compensation.weight.copy_(torch.eye(m, dtype=ref.dtype, device=ref.device))
            if layer.bias is not None:
                out.compensation.bias.copy_(layer.bias)
        return out

    @property
    def in_features(self) -> int:
        return self.inflated.in_features

    @property
    def out_features(self) -> int:
        return self.inflated.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compensation(self.inflated(x))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, top_k={self.top_k}, source={self.source!r}"

    def fused_weight(self) -> torch.Tensor:
        """C·W̃ (m×n), multiplied in float64 and returned in float64."""
        comp = self.compensation.weight.detach().to(torch.float64)
        return comp @ self.inflated.weight.detach().to(torch.float64)

    def fuse(self) -> nn.Module:
        """One layer of the ``source`` kind computing ``C·W̃·x + b`` (weights in this dtype)."""
        weight = self.fused_weight()
        dtype, device = self.inflated.weight.dtype, self.inflated.weight.device
        bias = self.compensation.bias
        if self.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            layer: Any = Conv1D(self.out_features, self.in_features)
            layer.to(device=device, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(weight.T)
                if bias is not None:
                    layer.bias.copy_(bias.detach())
                else:
                    layer.bias.zero_()
            return layer
        out = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, dtype=dtype, device=device
        )
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias.detach())
        return out


def linear_form(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``(W m×n, bias or None, source)`` of a defendable layer; Conv1D's weight is transposed."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, "linear"
    if type(module).__name__ == "Conv1D" and isinstance(module, linear_kinds()):
        conv: Any = module
        return conv.weight.T, conv.bias, "conv1d"
    raise SpecdefError(
        f"Cannot defend a {type(module).__name__}: SpecDef supports nn.Linear and Conv1D; "
        "exclude this layer."
    )


def defended_layers(model: nn.Module) -> dict[str, DefendedLinear]:
    """Every :class:`DefendedLinear` of ``model`` by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DefendedLinear)}


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Each parameter name → ``"inflated"``, ``"compensation"`` or ``"untouched"``."""
    prefixes = list(defended_layers(model))
    roles: dict[str, str] = {}
    for name, _ in model.named_parameters():
        role = "untouched"
        for prefix in prefixes:
            if name.startswith(prefix + ".inflated."):
                role = "inflated"
            elif name.startswith(prefix + ".compensation."):
                role = "compensation"
        roles[name] = role
    return roles


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class LayerReport:
    """What happened to one layer (a row of the manifest)."""

    name: str
    source: str  # "linear" or "conv1d"
    shape: tuple[int, int]  # (m, n) in the Linear form
    dtype: str
    bias: bool
    sigma_before: tuple[float, ...]  # top min(k + 5, rank) singular values of W
    sigma_after: tuple[float, ...]  # same count, of the stored W̃
    fro_before: float
    fro_after: float
    reconstruction_error: float  # ‖C·W̃ − W‖/‖W‖ in ``dtype``
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
    """The result of :func:`apply_specdef_`; :mod:`specdef.checkpoint` writes it as the manifest."""

    config: SpecDefConfig
    layers: tuple[LayerReport, ...]
    params_before: int
    params_after: int
    model_output_gap: float | None  # relative gap of the model output on the probe batch
    forced: bool  # True when force=True let a layer above tolerance through
    over_tolerance: tuple[str, ...]  # layers above tolerance (non-empty only when forced)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "model_output_gap": self.model_output_gap,
            "forced": self.forced,
            "over_tolerance": list(self.over_tolerance),
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
    from specdef import probe as probing

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
        basis, sigma = spectral.top_subspace_and_values(
            weight, config.top_k, method=config.method, generator=gen
        )
        inflated, compensation = spectral.deform_with_basis(weight, config.alpha, basis)
        error = spectral.reconstruction_error(weight, inflated, compensation, dtype=dtype)
        layer = DefendedLinear(
            n, m, bias=bias is not None, alpha=config.alpha, top_k=config.top_k, source=source,
            dtype=dtype, device=device,
        )  # fmt: skip
        layer.inflated.weight.copy_(inflated)
        layer.compensation.weight.copy_(compensation)
        if bias is not None:
            layer.compensation.bias.copy_(bias)
        gap = None
        if name in inputs:
            gap = probing.relative_gap(layer(inputs[name]), module(inputs[name]))
        count = min(config.top_k + 5, len(sigma))
        sigma_b = sigma[:count]
        sigma_a = spectral.top_singular_values(
            layer.inflated.weight, count, method=config.method, generator=gen
        )
        report = LayerReport(
            name=name, source=source, shape=(m, n), dtype=str(dtype).removeprefix("torch."),
            bias=bias is not None, sigma_before=tuple(sigma_b.tolist()),
            sigma_after=tuple(sigma_a.tolist()),
            fro_before=float(torch.linalg.matrix_norm(weight.double())),
            fro_after=float(torch.linalg.matrix_norm(layer.inflated.weight.double())),
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

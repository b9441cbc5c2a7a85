"""Informed attacks on SpecDef: function-preserving transforms an attacker who knows the defense
class applies before fine-tuning (the paper's limit, ``specdef-paper.md`` §4).

Each transform works **in place**, returns ``(model, TransformRecord)`` and keeps the function
(up to rounding in the model's dtype):

- ``fuse``: multiply each compensation pair back, ``W = C·W̃`` (no size increase);
- ``inject``: freeze each suspect layer and insert a trainable identity-initialised ``nn.Linear``
  (m×m, with bias) after it, so no gradient step touches an inflated parameter; ``inject:all-linear``
  does so after every linear map without detection (black-box). Size grows by ``m² + m`` per layer;
- ``factor:j``: split ``W̃ = T·W`` (``T = I + (α−1)P``) into ``j`` factors ``R^{j−1}·(R^{1−j}·W̃)``
  with ``R = T^{1/j} = I + (α^{1/j}−1)P``: each factor is inflated by ``α^{1/j}`` instead of α; the
  compensation stays. Size grows by ``(j−1)·m²`` per layer;
- ``untouched``: no change; the attack trains only parameters outside defended layers.

Pairs come from the defended structure (:class:`~specdef.defense.DefendedLinear` modules) when the
model has them, otherwise from :func:`specdef.detect.detect_model` on the weights alone. The record's
``frozen`` lists parameter-name prefixes the attack must keep frozen (``AttackSpec.frozen``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specdef.defense import (
    DefendedLinear,
    count_parameters,
    defended_layers,
    set_submodule,
    undo_specdef_,
)
from specdef.detect import Detection, compensation_signature, detect_model
from specdef.errors import SpecdefError, did_you_mean
from specdef.targets import candidate_layers, output_layer_names

log = logging.getLogger(__name__)

TRANSFORMS = ("fuse", "inject", "factor", "untouched")


@dataclass(frozen=True)
class TransformRecord:
    """What a transform did: the layers it acted on and the parameter count before/after.

    ``frozen``: parameter-name prefixes the attack must keep frozen; ``train``: the attack's
    ``AttackSpec.train`` mode the transform implies; ``source``: ``"structure"`` (defended modules)
    or ``"weights"`` (found by detection).
    """

    transform: str
    layers: tuple[str, ...]
    params_before: int
    params_after: int
    source: str
    frozen: tuple[str, ...] = ()
    train: str = "all"
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    @property
    def params_added_pct(self) -> float:
        return 100.0 * self.params_added / max(self.params_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transform": self.transform,
            "layers": list(self.layers),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_added": self.params_added,
            "params_added_pct": self.params_added_pct,
            "source": self.source,
            "frozen": list(self.frozen),
            "train": self.train,
            "details": dict(self.details),
        }


class InjectedLinear(nn.Module):
    """``forward(x) = adapter(frozen(x))``: a frozen layer followed by a trainable m×m ``adapter``
    initialised to the identity (weight ``I``, bias 0), so the function is unchanged."""

    def __init__(self, frozen: nn.Module, out_features: int) -> None:
        super().__init__()
        ref = next(frozen.parameters())
        self.frozen = frozen
        self.adapter = nn.Linear(out_features, out_features, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(out_features, dtype=ref.dtype))
            self.adapter.bias.zero_()
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.frozen(x))


@dataclass(frozen=True)
class _Pair:
    inflated: str  # module name of the m×n inflated layer
    compensation: str  # module name of the m×m compensation
    unit: str | None  # the DefendedLinear holding both, when the structure is known


def find_pairs(model: nn.Module) -> tuple[list[_Pair], list[str], str, Detection | None]:
    """``(pairs, unpaired suspects, source, detection)``: from the defended structure when the
    model has :class:`DefendedLinear` modules, otherwise detected from the weights."""
    units = defended_layers(model)
    if units:
        pairs = [_Pair(f"{n}.inflated", f"{n}.compensation", n) for n in units]
        return pairs, [], "structure", None
    found = detect_model(model)
    pairs = [_Pair(p.inflated, p.compensation, None) for p in found.pairs]
    return pairs, [s.name for s in found.suspects], "weights", found


def _out_features(module: nn.Module) -> int:
    if isinstance(module, DefendedLinear | nn.Linear):
        return int(module.out_features)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:  # transformers Conv1D: n×m
        return int(getattr(module, "nf", weight.shape[1]))
    raise SpecdefError(f"Cannot inject after a {type(module).__name__}: expected a linear layer.")


def _weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise SpecdefError(f"Expected a linear layer with a weight, found {type(module).__name__}.")
    return weight


def _oriented(module: nn.Module) -> torch.Tensor:
    """Weight as out×in in float64 (Conv1D stores in×out)."""
    weight = _weight(module).detach()
    if not isinstance(module, nn.Linear):
        weight = weight.T
    return weight.to(torch.float64)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        dtype=like.dtype,
        device=like.device,
    )
    with torch.no_grad():
        layer.weight.copy_(weight.to(like.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(like.dtype))
    return layer


def fuse_(model: nn.Module) -> tuple[nn.Module, TransformRecord]:
    """Fuse every compensation pair back into one layer (``W = C·W̃`` in float64), in place."""
    before = count_parameters(model)
    pairs, _, source, _ = find_pairs(model)
    if source == "structure":
        names = undo_specdef_(model)  # the exact undo of the defense
    else:
        names = []
        for pair in pairs:
            inflated = model.get_submodule(pair.inflated)
            comp = model.get_submodule(pair.compensation)
            fused = _oriented(comp) @ _oriented(inflated)
            b_in = getattr(inflated, "bias", None)
            c_bias = getattr(comp, "bias", None)
            b_comp = c_bias.detach().to(torch.float64) if isinstance(c_bias, torch.Tensor) else None
            bias = (
                _oriented(comp) @ b_in.detach().to(torch.float64)
                if isinstance(b_in, torch.Tensor)
                else None
            )
            if b_comp is not None:
                bias = b_comp if bias is None else bias + b_comp
            set_submodule(model, pair.inflated, _linear(fused, bias, _weight(inflated)))
            set_submodule(model, pair.compensation, nn.Identity())
            names.append(pair.inflated)
    record = TransformRecord("fuse", tuple(names), before, count_parameters(model), source)
    log.info("fuse: %d layers, %+d parameters", len(names), record.params_added)
    return model, record


def inject_(model: nn.Module, *, where: str = "suspects") -> tuple[nn.Module, TransformRecord]:
    """Freeze layers and insert an identity-initialised trainable m×m layer after each, in place.

    ``where="suspects"``: after each defended (or detected) layer; ``"all-linear"``: black-box,
    after every outermost linear map (each defended layer counts as one map).
    """
    if where not in ("suspects", "all-linear"):
        raise SpecdefError(did_you_mean(where, ("suspects", "all-linear"), what="inject target"))
    before = count_parameters(model)
    frozen: list[str] = []
    if where == "all-linear":
        units = set(defended_layers(model))
        skip = output_layer_names(model)  # an adapter after the LM head would be vocab × vocab
        order = list(dict(model.named_modules()))
        targets = sorted(
            (set(candidate_layers(model)) | units) - skip,
            key=order.index,
        )
        source = "structure" if units else "black-box"
    else:
        pairs, suspects, source, _ = find_pairs(model)
        targets = [p.unit or p.compensation for p in pairs] + suspects
        frozen += [p.inflated for p in pairs if p.unit is None]
    for name in targets:
        module = model.get_submodule(name)
        set_submodule(model, name, InjectedLinear(module, _out_features(module)))
        frozen.append(f"{name}.frozen")
    for prefix in frozen:
        for p in model.get_submodule(prefix).parameters():
            p.requires_grad_(False)
    record = TransformRecord(
        f"inject:{where}" if where != "suspects" else "inject",
        tuple(targets),
        before,
        count_parameters(model),
        source,
        frozen=tuple(frozen),
    )
    log.info("inject: %d layers, %+d parameters", len(targets), record.params_added)
    return model, record


def factor_(model: nn.Module, factors: int) -> tuple[nn.Module, TransformRecord]:
    """Split each inflated weight into ``factors`` layers, each inflated by ``α^(1/factors)``.

    ``W̃ = R^{j−1}·F₁`` with ``R = I + (a−1)P``, ``a = α^{1/j}``, ``F₁ = R^{1−j}·W̃ = T^{1/j}·W``;
    exact in float64 for any estimate of α, because all factors share the projector P.
    """
    if isinstance(factors, bool) or not isinstance(factors, int) or factors < 2:
        raise SpecdefError(f"factor needs j ≥ 2 factors (e.g. factor:2), found {factors!r}.")
    before = count_parameters(model)
    pairs, _, source, _ = find_pairs(model)
    alphas: dict[str, float] = {}
    for pair in pairs:
        inflated = model.get_submodule(pair.inflated)
        comp = model.get_submodule(pair.compensation)
        found = compensation_signature(pair.compensation, _weight(comp))
        if found is None:
            raise SpecdefError(
                f"{pair.compensation}: expected a compensation I + (1/α−1)P, found a weight without "
                "that spectrum (was it trained?); use fuse or inject instead."
            )
        sig, basis = found
        proj = basis @ basis.T
        eye = torch.eye(sig.size, dtype=torch.float64, device=proj.device)
        a = sig.alpha ** (1.0 / factors)
        step = eye + (a - 1.0) * proj
        first = (eye + (a ** (1 - factors) - 1.0) * proj) @ _oriented(inflated).to(proj.device)
        like = _weight(inflated)
        chain = [_linear(first, None, like)] + [
            _linear(step, None, like) for _ in range(factors - 1)
        ]
        if pair.unit is not None:
            set_submodule(model, pair.unit, nn.Sequential(*chain, comp))
            alphas[pair.unit] = sig.alpha
        else:
            set_submodule(model, pair.inflated, nn.Sequential(*chain))
            alphas[pair.inflated] = sig.alpha
    record = TransformRecord(
        f"factor:{factors}",
        tuple(alphas),
        before,
        count_parameters(model),
        source,
        details={
            "alpha": alphas,
            "factor_alpha": {k: v ** (1 / factors) for k, v in alphas.items()},
        },
    )
    log.info("factor:%d: %d layers, %+d parameters", factors, len(alphas), record.params_added)
    return model, record


def untouched_(model: nn.Module) -> tuple[nn.Module, TransformRecord]:
    """Freeze every inflated and compensation parameter; the model is otherwise unchanged."""
    count = count_parameters(model)
    pairs, suspects, source, _ = find_pairs(model)
    frozen: list[str] = []
    for pair in pairs:
        frozen += [pair.unit] if pair.unit else [pair.inflated, pair.compensation]
    frozen += suspects
    for prefix in frozen:
        for p in model.get_submodule(prefix).parameters():
            p.requires_grad_(False)
    record = TransformRecord(
        "untouched",
        tuple(p.unit or p.inflated for p in pairs) + tuple(suspects),
        count,
        count,
        source,
        frozen=tuple(frozen),
        train="untouched" if source == "structure" else "all",
    )
    return model, record


def parse_adaptive(spec: str) -> tuple[str, str | None]:
    """``"factor:4"`` → ``("factor", "4")``; validates the transform name."""
    name, _, arg = spec.partition(":")
    if name not in TRANSFORMS:
        raise SpecdefError(did_you_mean(name, TRANSFORMS, what="adaptive transform"))
    if name == "factor" and not arg.isdigit():
        raise SpecdefError(f"factor needs a number of factors, e.g. factor:2; found {spec!r}.")
    if name == "inject" and arg not in ("", "all-linear", "suspects"):
        raise SpecdefError(f"inject takes no argument or ':all-linear', found {spec!r}.")
    if name in ("fuse", "untouched") and arg:
        raise SpecdefError(f"{name} takes no argument, found {spec!r}.")
    return name, arg or None


def apply_adaptive(model: nn.Module, spec: str) -> tuple[nn.Module, TransformRecord]:
    """Apply the transform named by ``spec`` (``fuse``, ``inject[:all-linear]``, ``factor:J``,
    ``untouched``) in place; returns the model and the record."""
    name, arg = parse_adaptive(spec)
    if name == "fuse":
        return fuse_(model)
    if name == "inject":
        return inject_(model, where=arg or "suspects")
    if name == "factor":
        return factor_(model, int(arg or 0))
    return untouched_(model)

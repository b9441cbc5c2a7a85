"""Informed attacks on SpecDef: function-preserving transforms an attacker who knows the defense
class applies before fine-tuning (the paper's limit, ``specdef-paper.md`` §4).

Each transform works **in place**, returns ``(model, TransformRecord)`` and keeps the function
(up to rounding in the model's dtype):

- ``fuse``: multiply each compensation pair back, ``W = C·W̃`` (no size increase);
- ``inject``: freeze each suspect layer and put a trainable layer beside it that leaves the function
  unchanged, so no gradient step touches an inflated parameter. The default is the paper's
  construction, an identity-initialised m×m layer after it (``inject`` = ``inject:after``);
  ``inject:before`` puts an n×n one before it; ``inject:auto`` takes the larger side, so that for a
  full-rank W the pair still reaches every m×n weight (``A·W`` needs rank n, ``W·A`` rank m: an m×m
  adapter after a wide 10×128 head can only mix its 10 rows). ``inject:parallel`` adds a
  zero-initialised m×n layer beside it (``W·x + B·x``): training B is training W, step for step.
  Size grows by ``s² + s`` (s = m, n or max(m, n)) or ``m·n + m`` per layer. ``inject:all-linear``
  does this for every linear map without detection (black-box);
- ``factor:j``: split ``W̃ = T·W`` (``T = I + (α−1)P``) into ``j`` factors ``R^{j−1}·(R^{1−j}·W̃)``
  with ``R = T^{1/j} = I + (α^{1/j}−1)P``: each factor is inflated by ``α^{1/j}`` instead of α; the
  compensation stays (``factor:j:freeze`` keeps it frozen). Size grows by ``(j−1)·m²`` per layer;
- ``untouched``: no change; the attack trains only parameters outside defended layers;
- ``rebalance``: the undo of *native* deformation (:mod:`specdef.native`): move every symmetric pair
  to its balanced representative (:func:`specdef.native.rebalance_`); no size increase, and it needs
  only the architecture, not the pairs' original weights.

Pairs come from the defended structure (:class:`~specdef.defense.DefendedLinear` modules) when the
model has them, otherwise from :func:`specdef.detect.detect_model` on the weights alone (whose
natively deformed pairs count as suspects: their inflated side). The record's ``frozen`` lists
parameter-name prefixes the attack must keep frozen (``AttackSpec.frozen``).
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

TRANSFORMS = ("fuse", "inject", "factor", "untouched", "rebalance")
SIDES = ("after", "before", "auto", "parallel")  # where inject puts its adapter (auto: larger side)


@dataclass(frozen=True)
class TransformRecord:
    """What a transform did: the layers it acted on and the parameter count before/after.

    ``frozen``: parameter-name prefixes the attack must keep frozen; ``train``: the attack's
    ``AttackSpec.train`` mode the transform implies; ``source``: ``"structure"`` (defended modules),
    ``"weights"`` (found by detection) or ``"architecture"`` (symmetric pairs, for rebalance).
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
    """A frozen linear map ``frozen`` (m×n) and a trainable ``adapter`` that leaves the function
    unchanged at initialisation: ``adapter(frozen(x))`` with an m×m identity for ``side="after"``,
    ``frozen(adapter(x))`` with an n×n identity for ``"before"``, ``frozen(x) + adapter(x)`` with
    an m×n zero layer for ``"parallel"`` (bias 0 in each case)."""

    def __init__(
        self, frozen: nn.Module, *, out_features: int, in_features: int, side: str = "after"
    ) -> None:
        super().__init__()
        if side not in ("after", "before", "parallel"):
            raise SpecdefError(did_you_mean(side, ("after", "before", "parallel"), what="side"))
        ref = next(frozen.parameters())
        rows = in_features if side == "before" else out_features
        cols = out_features if side == "after" else in_features
        self.side = side
        self.frozen = frozen
        self.adapter = nn.Linear(cols, rows, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            self.adapter.bias.zero_()
            if side == "parallel":
                self.adapter.weight.zero_()
            else:
                self.adapter.weight.copy_(torch.eye(rows, dtype=ref.dtype))
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "before":
            return self.frozen(self.adapter(x))
        if self.side == "parallel":
            return self.frozen(x) + self.adapter(x)
        return self.adapter(self.frozen(x))

    def extra_repr(self) -> str:
        return f"side={self.side!r}"


@dataclass(frozen=True)
class _Pair:
    inflated: str  # module name of the m×n inflated layer
    compensation: str  # module name of the m×m compensation
    unit: str | None  # the DefendedLinear holding both, when the structure is known


def find_pairs(
    model: nn.Module, transform: str = ""
) -> tuple[list[_Pair], list[str], str, Detection | None]:
    """``(pairs, unpaired suspects, source, detection)``: from the defended structure when the
    model has :class:`DefendedLinear` modules, otherwise detected from the weights. ``fuse`` and
    ``factor`` (``transform``) are refused on a natively deformed model, where they would do
    nothing."""
    units = defended_layers(model)
    if units:
        pairs = [_Pair(f"{n}.inflated", f"{n}.compensation", n) for n in units]
        return pairs, [], "structure", None
    found = detect_model(model)
    if not found.pairs and found.native_deformed and transform in ("fuse", "factor"):
        raise SpecdefError(
            f"{transform} acts on Algorithm 1 compensation pairs; found none, but "
            f"{len(found.native_deformed)} natively deformed symmetric pairs: use --adaptive rebalance."
        )
    pairs = [_Pair(p.inflated, p.compensation, None) for p in found.pairs]
    suspects = [s.name for s in found.suspects] + [p.inflated for p in found.native_deformed]
    return pairs, suspects, "weights", found


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` features of a linear map (nn.Linear, Conv1D, DefendedLinear)."""
    if isinstance(module, DefendedLinear | nn.Linear):
        return int(module.out_features), int(module.in_features)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:  # transformers Conv1D: n×m
        return int(weight.shape[1]), int(weight.shape[0])
    raise SpecdefError(f"Cannot inject around a {type(module).__name__}: expected a linear layer.")


def _side(side: str, out_features: int, in_features: int) -> str:
    """``auto``: the larger side. For a full-rank W (m×n), ``A·W`` (after, m×m) reaches every m×n
    matrix when n ≤ m and ``W·A`` (before, n×n) when m ≤ n; the smaller side would not."""
    if side != "auto":
        return side
    return "after" if out_features >= in_features else "before"


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
    pairs, _, source, _ = find_pairs(model, "fuse")
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


def inject_(
    model: nn.Module, *, where: str = "suspects", side: str = "after"
) -> tuple[nn.Module, TransformRecord]:
    """Freeze layers and put a trainable identity-initialised square layer beside each, in place.

    ``where="suspects"``: each defended (or detected) layer; ``"all-linear"``: black-box, every
    outermost linear map (a defended layer counts as one map; the LM head is skipped). ``side``:
    ``"after"`` (m×m, the paper's construction; default), ``"before"`` (n×n), ``"auto"`` (the
    larger) or
    ``"parallel"`` (a zero-initialised m×n layer added beside it).
    Gradients reach the adapter only through the product ``C·W̃ = W``, never the inflated factor.
    """
    if where not in ("suspects", "all-linear"):
        raise SpecdefError(did_you_mean(where, ("suspects", "all-linear"), what="inject target"))
    if side not in SIDES:
        raise SpecdefError(did_you_mean(side, SIDES, what="adapter side"))
    before = count_parameters(model)
    frozen: list[str] = []
    # (module to wrap, its other half to freeze or None, (out, in) of the whole linear map)
    plan: list[tuple[str, str | None, tuple[int, int]]] = []
    if where == "all-linear":
        units = set(defended_layers(model))
        skip = output_layer_names(model)  # an adapter after the LM head would be vocab × vocab
        order = list(dict(model.named_modules()))
        names = sorted((set(candidate_layers(model)) | units) - skip, key=order.index)
        plan = [(n, None, _shape(model.get_submodule(n))) for n in names]
        source = "structure" if units else "black-box"
    else:
        pairs, suspects, source, _ = find_pairs(model)
        for pair in pairs:
            if pair.unit is not None:
                plan.append((pair.unit, None, _shape(model.get_submodule(pair.unit))))
                continue
            out_f = _shape(model.get_submodule(pair.compensation))[0]
            in_f = _shape(model.get_submodule(pair.inflated))[1]
            if side == "parallel":
                raise SpecdefError(
                    f"inject:parallel needs each pair as one module; {pair.inflated!r} and "
                    f"{pair.compensation!r} are separate modules. Use inject:after or inject:before."
                )
            if _side(side, out_f, in_f) == "after":
                plan.append((pair.compensation, pair.inflated, (out_f, in_f)))
            else:
                plan.append((pair.inflated, pair.compensation, (out_f, in_f)))
        plan += [(n, None, _shape(model.get_submodule(n))) for n in suspects]
    sides: dict[str, str] = {}
    for name, other, (out_f, in_f) in plan:
        chosen = _side(side, out_f, in_f)
        module = model.get_submodule(name)
        if other is not None:  # a detected leaf pair: the adapter sits beside the whole pair
            out_f, in_f = _shape(module)
            frozen.append(other)
        wrapped = InjectedLinear(module, out_features=out_f, in_features=in_f, side=chosen)
        set_submodule(model, name, wrapped)
        frozen.append(f"{name}.frozen")
        sides[name] = chosen
    for prefix in frozen:
        for p in model.get_submodule(prefix).parameters():
            p.requires_grad_(False)
    label = (
        "inject"
        + (f":{side}" if side != "after" else "")
        + (":all-linear" if where == "all-linear" else "")
    )
    record = TransformRecord(
        label,
        tuple(sides),
        before,
        count_parameters(model),
        source,
        frozen=tuple(frozen),
        details={"side": sides},
    )
    log.info("%s: %d layers, %+d parameters", label, len(sides), record.params_added)
    return model, record


def factor_(
    model: nn.Module, factors: int, *, freeze_compensation: bool = False
) -> tuple[nn.Module, TransformRecord]:
    """Split each inflated weight into ``factors`` layers, each inflated by ``α^(1/factors)``.

    ``W̃ = R^{j−1}·F₁`` with ``R = I + (a−1)P``, ``a = α^{1/j}``, ``F₁ = R^{1−j}·W̃ = T^{1/j}·W``;
    exact in float64 for any estimate of α, because all factors share the projector P. The
    compensation C stays (trainable unless ``freeze_compensation``): it still receives activations
    inflated by α in range(P), whatever j is.
    """
    if isinstance(factors, bool) or not isinstance(factors, int) or factors < 2:
        raise SpecdefError(f"factor needs j ≥ 2 factors (e.g. factor:2), found {factors!r}.")
    before = count_parameters(model)
    pairs, _, source, _ = find_pairs(model, "factor")
    alphas: dict[str, float] = {}
    frozen: list[str] = []
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
            frozen.append(f"{pair.unit}.{factors}")
        else:
            set_submodule(model, pair.inflated, nn.Sequential(*chain))
            alphas[pair.inflated] = sig.alpha
            frozen.append(pair.compensation)
    if not freeze_compensation:
        frozen = []
    for prefix in frozen:
        for p in model.get_submodule(prefix).parameters():
            p.requires_grad_(False)
    record = TransformRecord(
        f"factor:{factors}" + (":freeze" if freeze_compensation else ""),
        tuple(alphas),
        before,
        count_parameters(model),
        source,
        frozen=tuple(frozen),
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


def rebalance_model_(model: nn.Module) -> tuple[nn.Module, TransformRecord]:
    """Balance every symmetric pair in place (the undo of native deformation); ``details`` holds
    each pair's imbalance (log10) before and after. Refuses a model without symmetric pairs and an
    Algorithm 1 model, whose compensation layers rebalance cannot remove (that is ``fuse``)."""
    from specdef.native import find_symmetric_pairs, rebalance_

    units = defended_layers(model)
    if units or not find_symmetric_pairs(model):
        found = f"{len(units)} Algorithm 1 defended layers" if units else "no symmetric pair"
        raise SpecdefError(
            f"rebalance undoes native deformation along exact symmetries (attention V/O, gated-MLP "
            f"up/down, Linear→ReLU→Linear); found {found} in {type(model).__name__}. For an "
            "Algorithm 1 checkpoint use --adaptive fuse."
        )
    count = count_parameters(model)
    report = rebalance_(model)
    details = {"imbalance_log10": {k: {"before": b, "after": a} for k, (b, a) in report.items()}}
    log.info("rebalance: %d pairs, no parameter added", len(report))
    return model, TransformRecord(
        "rebalance", tuple(report), count, count_parameters(model), "architecture", details=details
    )


def parse_adaptive(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"factor:4"`` → ``("factor", ("4",))``, ``"inject:after:all-linear"`` → ``("inject",
    ("after", "all-linear"))``; validates names and arguments."""
    name, *rest = spec.split(":")
    args = tuple(rest)
    if name not in TRANSFORMS:
        raise SpecdefError(did_you_mean(name, TRANSFORMS, what="adaptive transform"))
    if name == "factor" and (
        len(args) not in (1, 2) or not args[0].isdigit() or args[1:] not in ((), ("freeze",))
    ):
        raise SpecdefError(
            f"factor needs a number of factors and optionally ':freeze' (keep the compensation "
            f"frozen), e.g. factor:2 or factor:2:freeze; found {spec!r}."
        )
    if name == "inject":
        allowed = (*SIDES, "all-linear", "suspects")
        for arg in args:
            if arg not in allowed:
                raise SpecdefError(
                    f"inject takes options from {', '.join(allowed)} (e.g. inject:after or "
                    f"inject:all-linear); found {arg!r} in {spec!r}."
                )
    if name in ("fuse", "untouched", "rebalance") and args:
        raise SpecdefError(f"{name} takes no argument, found {spec!r}.")
    return name, args


def apply_adaptive(model: nn.Module, spec: str) -> tuple[nn.Module, TransformRecord]:
    """Apply the transform named by ``spec`` in place: ``fuse``, ``inject[:after|before|auto|
    parallel][:all-linear]``, ``factor:J[:freeze]``, ``untouched`` or ``rebalance``. Returns the
    model and the record."""
    name, args = parse_adaptive(spec)
    if name == "fuse":
        return fuse_(model)
    if name == "rebalance":
        return rebalance_model_(model)
    if name == "inject":
        where = "all-linear" if "all-linear" in args else "suspects"
        side = next((a for a in args if a in SIDES), "after")
        return inject_(model, where=where, side=side)
    if name == "factor":
        return factor_(model, int(args[0]), freeze_compensation=args[1:] == ("freeze",))
    return untouched_(model)

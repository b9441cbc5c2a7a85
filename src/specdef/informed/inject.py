"""The ``inject`` transform: freeze each defended (or detected, or every) linear map and put a
trainable :class:`InjectedLinear` adapter beside it that leaves the function unchanged, so no
gradient step touches an inflated parameter; and its control, the same adapters on an undefended
model (:func:`control_inject_`). Public through :mod:`specdef.informed.transforms`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from specdef.defense.layer import DefendedLinear, count_parameters, defended_layers, set_submodule
from specdef.defense.targets import candidate_layers, output_layer_names, select_targets
from specdef.errors import SpecdefError, did_you_mean
from specdef.informed.targets import TransformRecord, _Pair, find_pairs

log = logging.getLogger(__name__)

SIDES = ("after", "before", "auto", "parallel")  # where inject puts its adapter (auto: larger side)


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


def _refuse_native_chains(pairs: list[_Pair]) -> None:
    """Natively deformed pairs that share a layer (a Linear→ReLU→Linear→ReLU→Linear chain) leave
    no place outside every deformed pair for an adapter next to the shared layer."""
    seen: dict[str, str] = {}
    for pair in (p for p in pairs if p.native):
        for name in (pair.inflated, pair.compensation):
            if name in seen:
                raise SpecdefError(
                    f"inject: {name!r} belongs to two natively deformed pairs ({seen[name]} and "
                    f"{pair.inflated}+{pair.compensation}); an adapter next to it would sit inside "
                    "one of them. Use --adaptive rebalance (the undo of native deformation)."
                )
            seen[name] = f"{pair.inflated}+{pair.compensation}"


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
        _refuse_native_chains(pairs)
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
            # A native pair has a nonlinearity between its sides: the adapter goes after the
            # compensating side or before the inflated one, never between them.
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


def control_inject_(
    model: nn.Module, *, targets: str | tuple[str, ...] = "all-linear", side: str = "after"
) -> tuple[nn.Module, TransformRecord]:
    """The control for ``inject``, in place: on an **undefended** model, wrap each layer that
    ``targets`` selects (what the defense would defend, :func:`specdef.defense.targets.select_targets`)
    in the :class:`InjectedLinear` adapter ``inject`` would put there (``side``: after, before or
    parallel; auto = the larger side), its own weight frozen. Refuses a defended model: the
    control is the undefended reference."""
    units = defended_layers(model)
    if units:
        raise SpecdefError(
            f"control:inject is the undefended reference for inject; found {len(units)} defended "
            "layers. Run it on the undefended model (or use --adaptive inject on the defended one)."
        )
    if side not in SIDES:
        raise SpecdefError(did_you_mean(side, SIDES, what="adapter side"))
    before = count_parameters(model)
    names = select_targets(model, targets)
    sides: dict[str, str] = {}
    for name in names:
        layer = model.get_submodule(name)
        out_f, in_f = _shape(layer)
        chosen = _side(side, out_f, in_f)
        wrapped = InjectedLinear(layer, out_features=out_f, in_features=in_f, side=chosen)
        set_submodule(model, name, wrapped)
        sides[name] = chosen
    record = TransformRecord(
        "control:inject" + (f":{side}" if side != "after" else ""),
        tuple(names),
        before,
        count_parameters(model),
        "targets",
        frozen=tuple(f"{n}.frozen" for n in names),
        details={"side": sides, "targets": targets if isinstance(targets, str) else list(targets)},
    )
    log.info("control:inject: %d layers, %+d parameters", len(names), record.params_added)
    return model, record

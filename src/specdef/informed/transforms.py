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
- ``rebalance``: the undo of *native* deformation (:mod:`specdef.native.apply`): move every symmetric pair
  to its balanced representative (:func:`specdef.native.apply.rebalance_`); no size increase, and it needs
  only the architecture, not the pairs' original weights.
- ``control:inject[:SIDE][@TARGETS]``: not an attack but its control: ``inject``'s adapters around the
  layers a defense *would* select (``TARGETS``: comma-separated layer names such as
  ``layers.2,layers.4``, ``all-linear`` (the default) or ``preset:llama``) on an **undefended**
  model. If ``inject`` on the defended model trains like this, what it loses against the
  undefended model is the price of the reparametrisation ``A·W``, not a remnant of the defense.

Transforms are entries of a registry (:data:`REGISTRY`, :func:`register_transform`): a name, a
check of its ``:``-separated arguments, and the in-place function; :func:`parse_transform` reads a
spec ``NAME[:ARG…][@TARGETS]`` and :func:`apply_adaptive` dispatches on the entry, never on a name.

Pairs come from the defended structure (:class:`~specdef.defense.layer.DefendedLinear` modules) when the
model has them, otherwise from :func:`specdef.informed.detect.detect_model` on the weights alone (whose
natively deformed pairs count as suspects: their inflated side). The record's ``frozen`` lists
parameter-name prefixes the attack must keep frozen (``AttackSpec.frozen``). ``inject`` is in
:mod:`specdef.informed.inject`, the pair finding and the record in :mod:`specdef.informed.targets`
(both re-exported here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from specdef.defense.apply import undo_specdef_
from specdef.defense.layer import count_parameters, defended_layers, set_submodule
from specdef.errors import SpecdefError, did_you_mean
from specdef.informed.detect import compensation_signature
from specdef.informed.inject import SIDES, InjectedLinear, control_inject_, inject_
from specdef.informed.targets import TransformRecord, find_pairs
from specdef.native.apply import rebalance_
from specdef.native.pairs import find_symmetric_pairs

__all__ = [
    "REGISTRY",
    "SIDES",
    "TRANSFORMS",
    "InjectedLinear",
    "Transform",
    "TransformRecord",
    "TransformSpec",
    "apply_adaptive",
    "control_inject_",
    "factor_",
    "find_pairs",
    "fuse_",
    "inject_",
    "parse_adaptive",
    "parse_transform",
    "rebalance_model_",
    "register_transform",
    "untouched_",
]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TransformSpec:
    """A parsed transform spec ``NAME[:ARG…][@TARGETS]``: ``"factor:2:freeze"`` →
    ``("factor", ("2", "freeze"), None)``; ``"control:inject@layers.2"`` → ``("control",
    ("inject",), ("layers.2",))``. ``targets`` is a layer selection (names, ``all-linear``,
    ``preset:NAME``) for the transforms that take one."""

    name: str
    args: tuple[str, ...] = ()
    targets: str | tuple[str, ...] | None = None


ApplyFn = Callable[[nn.Module, TransformSpec], tuple[nn.Module, TransformRecord]]


@dataclass(frozen=True)
class Transform:
    """A registry entry: ``check`` raises :class:`SpecdefError` on bad arguments (before any
    model is loaded), ``apply`` transforms a model in place; ``takes_targets`` says whether the
    spec may carry ``@TARGETS``."""

    name: str
    summary: str
    check: Callable[[TransformSpec], None]
    apply: ApplyFn
    takes_targets: bool = False


REGISTRY: dict[str, Transform] = {}


def register_transform(entry: Transform) -> Transform:
    """Add ``entry`` to :data:`REGISTRY` (a name is registered once)."""
    if entry.name in REGISTRY:
        raise SpecdefError(f"Transform {entry.name!r} is already registered.")
    REGISTRY[entry.name] = entry
    return entry


def _no_args(spec: TransformSpec) -> None:
    if spec.args:
        raise SpecdefError(f"{spec.name} takes no argument, found {_text(spec)!r}.")


def _check_factor(spec: TransformSpec) -> None:
    args = spec.args
    if len(args) not in (1, 2) or not args[0].isdigit() or args[1:] not in ((), ("freeze",)):
        raise SpecdefError(
            f"factor needs a number of factors and optionally ':freeze' (keep the compensation "
            f"frozen), e.g. factor:2 or factor:2:freeze; found {_text(spec)!r}."
        )


def _check_inject(spec: TransformSpec) -> None:
    allowed = (*SIDES, "all-linear", "suspects")
    for arg in spec.args:
        if arg not in allowed:
            raise SpecdefError(
                f"inject takes options from {', '.join(allowed)} (e.g. inject:after or "
                f"inject:all-linear); found {arg!r} in {_text(spec)!r}."
            )


def _check_control(spec: TransformSpec) -> None:
    if (
        not spec.args
        or spec.args[0] != "inject"
        or len(spec.args) > 2
        or (spec.args[1:] and spec.args[1] not in SIDES)
    ):
        raise SpecdefError(
            f"control takes the transform it controls and optionally a side: control:inject"
            f"[:{'|'.join(SIDES)}][@TARGETS], e.g. control:inject@layers.2; found {_text(spec)!r}."
        )


def _apply_inject(model: nn.Module, spec: TransformSpec) -> tuple[nn.Module, TransformRecord]:
    where = "all-linear" if "all-linear" in spec.args else "suspects"
    side = next((a for a in spec.args if a in SIDES), "after")
    return inject_(model, where=where, side=side)


def _apply_factor(model: nn.Module, spec: TransformSpec) -> tuple[nn.Module, TransformRecord]:
    return factor_(model, int(spec.args[0]), freeze_compensation=spec.args[1:] == ("freeze",))


def _apply_control(model: nn.Module, spec: TransformSpec) -> tuple[nn.Module, TransformRecord]:
    side = spec.args[1] if len(spec.args) > 1 else "after"
    return control_inject_(model, targets=spec.targets or "all-linear", side=side)


for _entry in (
    Transform("fuse", "multiply each compensation pair back (W = C·W̃)", _no_args,
              lambda m, s: fuse_(m)),
    Transform("inject", "freeze each defended layer, train an adapter beside it", _check_inject,
              _apply_inject),
    Transform("factor", "split the inflation into j factors of α^(1/j)", _check_factor,
              _apply_factor),
    Transform("untouched", "train only parameters outside defended layers", _no_args,
              lambda m, s: untouched_(m)),
    Transform("rebalance", "balance every symmetric pair (undo of native deformation)", _no_args,
              lambda m, s: rebalance_model_(m)),
    Transform("control", "control:inject — inject's adapters on the undefended model",
              _check_control, _apply_control, takes_targets=True),
):  # fmt: skip
    register_transform(_entry)

TRANSFORMS = tuple(REGISTRY)  # the registered names, in registration order


def _text(spec: TransformSpec) -> str:
    text = ":".join((spec.name, *spec.args))
    if spec.targets is not None:
        targets = spec.targets if isinstance(spec.targets, str) else ",".join(spec.targets)
        text += f"@{targets}"
    return text


def parse_transform(spec: str) -> TransformSpec:
    """Parse ``NAME[:ARG…][@TARGETS]`` and check it against the registry. ``TARGETS`` is
    ``all-linear``, ``preset:NAME`` or comma-separated layer names (exact or dotted suffix)."""
    head, at, tail = spec.partition("@")
    name, *rest = head.split(":")
    entry = REGISTRY.get(name)
    if entry is None:
        raise SpecdefError(did_you_mean(name, tuple(REGISTRY), what="adaptive transform"))
    targets: str | tuple[str, ...] | None = None
    if at:
        if not entry.takes_targets:
            raise SpecdefError(
                f"{name} takes no @TARGETS (it finds the defended layers itself); found {spec!r}."
            )
        if not tail:
            raise SpecdefError(f"Expected a layer selection after '@' in {spec!r}, e.g. @layers.2.")
        # all-linear / preset:NAME as selection strings; anything else is a list of layer names
        # (exact or dotted suffix), never a regex: a name with a dot must mean that layer
        keyword = tail.lower() == "all-linear" or tail.startswith("preset:")
        targets = tail if keyword else tuple(t for t in tail.split(",") if t)
    parsed = TransformSpec(name, tuple(rest), targets)
    entry.check(parsed)
    return parsed


def parse_adaptive(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"factor:4"`` → ``("factor", ("4",))``, ``"inject:after:all-linear"`` → ``("inject",
    ("after", "all-linear"))``; validates names and arguments (:func:`parse_transform`)."""
    parsed = parse_transform(spec)
    return parsed.name, parsed.args


def apply_adaptive(model: nn.Module, spec: str) -> tuple[nn.Module, TransformRecord]:
    """Apply the transform named by ``spec`` in place: ``fuse``, ``inject[:after|before|auto|
    parallel][:all-linear]``, ``factor:J[:freeze]``, ``untouched``, ``rebalance`` or
    ``control:inject[:SIDE][@TARGETS]``. Returns the model and the record."""
    parsed = parse_transform(spec)
    return REGISTRY[parsed.name].apply(model, parsed)

"""What an informed transform acts on and what it reports: :func:`find_pairs` takes the
compensation pairs from the defended structure (:class:`~specdef.defense.layer.DefendedLinear` modules)
or, without one, from :func:`specdef.informed.detect.detect_model` on the weights alone;
:class:`TransformRecord` is what every transform returns. Public through :mod:`specdef.informed.transforms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from specdef.defense.layer import defended_layers
from specdef.errors import SpecdefError
from specdef.informed.detect import detect_model
from specdef.informed.detection import Detection


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


@dataclass(frozen=True)
class _Pair:
    inflated: str  # module name of the m×n inflated layer
    compensation: str  # the m×m compensation, or a native pair's compensating side
    unit: str | None  # the DefendedLinear holding both, when the structure is known
    native: bool = False  # a natively deformed symmetric pair (a nonlinearity between the sides)


def find_pairs(
    model: nn.Module, transform: str = ""
) -> tuple[list[_Pair], list[str], str, Detection | None]:
    """``(pairs, unpaired suspects, source, detection)``: from the defended structure when the
    model has :class:`DefendedLinear` modules, otherwise detected from the weights, natively
    deformed symmetric pairs included (both sides named, so that ``untouched`` freezes both and
    ``inject`` puts its adapter outside the pair). ``fuse`` and ``factor`` (``transform``) are
    refused on a natively deformed model, where they would do nothing."""
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
    if transform not in ("fuse", "factor"):  # they act on Algorithm 1 pairs only
        pairs += [_Pair(p.inflated, p.compensating, None, True) for p in found.native_deformed]
    return pairs, [s.name for s in found.suspects], "weights", found

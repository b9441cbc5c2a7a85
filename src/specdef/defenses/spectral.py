"""SpecDef as registry entries, wrapping the existing pipeline (nothing re-implemented): Algorithm 1
(:func:`specdef.defense.apply.apply_specdef_`), the native deformation
(:func:`specdef.native.apply.apply_native_`), and SpecDef on top of an unlearned model — the
paper's Table 1 setting (an unlearning defense from the registry, then Algorithm 1).

``specdef defend --defense specdef|native`` goes through :func:`specdef.release.defend.defend`,
the one defend entry point (precision guard, probe batch, card, manifest); these in-memory
entries are what an experiment or a composed defense calls on a live model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defenses.registry import Defended, DefenseEntry, make_defense
from specdef.errors import SpecdefError
from specdef.native.apply import apply_native_

SPECDEF_CITE = "SpecDef: arXiv 2602.18868 (convergence-rate control), Algorithm 1"


def _specdef(model: nn.Module, config: Any, data: Any) -> Defended:
    report = apply_specdef_(model, config)
    return Defended(model, {"specdef": report.to_dict()})


def _native(model: nn.Module, config: Any, data: Any) -> Defended:
    pairs = apply_native_(model, config)
    return Defended(model, {"native": {"pairs": [pair.as_dict() for pair in pairs]}})


@dataclass(frozen=True)
class UnlearnedSpecDefConfig:
    """unlearning: a training defense of the registry, run first, with ``unlearning_config``;
    then SpecDef Algorithm 1 with ``alpha``, ``top_k`` and ``targets``."""

    unlearning: str = "gradient-ascent"
    unlearning_config: dict[str, Any] = field(default_factory=dict)
    alpha: float = 1e4
    top_k: int = 8
    targets: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        SpecDefConfig(alpha=self.alpha, top_k=self.top_k, targets=self.targets)  # validates


def _unlearned_specdef(model: nn.Module, config: Any, data: Any) -> Defended:
    unlearning = make_defense(config.unlearning, config.unlearning_config)
    if not unlearning.entry.needs_data or unlearning.entry.changes_architecture:
        raise SpecdefError(
            f"unlearned-specdef: {config.unlearning!r} is not an unlearning (training) defense; "
            "pick one such as gradient-ascent, npo, rmu, repnoise or tar."
        )
    unlearned = unlearning.apply(model, data)
    report = apply_specdef_(
        unlearned.model,
        SpecDefConfig(alpha=config.alpha, top_k=config.top_k, targets=config.targets),
    )
    return Defended(unlearned.model, {"unlearning": unlearned.record, "specdef": report.to_dict()})


def _spec_entry(
    name: str, apply: Callable[..., Defended], summary: str, *, arch: bool
) -> DefenseEntry:
    return DefenseEntry(
        name=name,
        config=SpecDefConfig,
        apply=apply,
        summary=summary,
        cites=SPECDEF_CITE,
        deviations="none: the project's implementation (docs/ARCHITECTURE.md, docs/precision.md)",
        training_free=True,
        changes_architecture=arch,
    )


ENTRIES = (
    _spec_entry(
        "specdef",
        _specdef,
        "inflate the top-k singular values by α, with exact compensation layers",
        arch=True,
    ),
    _spec_entry(
        "native",
        _native,
        "inflate along the network's own symmetric layer pairs (same architecture)",
        arch=False,
    ),
    DefenseEntry(
        name="unlearned-specdef",
        config=UnlearnedSpecDefConfig,
        apply=_unlearned_specdef,
        summary="unlearn with a registry defense, then SpecDef Algorithm 1 (the paper's Table 1)",
        cites=SPECDEF_CITE + ", Table 1 (SpecDef on top of an unlearned model)",
        deviations="the unlearning step is one of this registry's small baselines, not the "
        "paper's ELM/RMU-unlearned Llama-3.1-8B",
        needs_data=True,
        changes_architecture=True,
    ),
)

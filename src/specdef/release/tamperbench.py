"""SpecDef in TamperBench's defense interface: a config dataclass with ``input_checkpoint_path`` and
``output_checkpoint_path`` (TamperBench's ``AlignmentDefenseConfig``), a defense object whose
``run_defense()`` returns the output checkpoint's path (TamperBench's ``AlignmentDefense``), and
the one-call form :func:`run_defense`. TamperBench itself is not a dependency: these mirror its
fields and method, so its registry can wrap :class:`SpecDefDefense` directly.

The output is a Hugging Face directory. An Algorithm-1 checkpoint loads with stock
``AutoModelForCausalLM.from_pretrained`` once ``specdef`` is imported (model type ``specdef``); a
native one (``mode="native"``) loads with stock transformers alone, same architecture.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from specdef.defense.config import SpecDefConfig
from specdef.errors import SpecdefError
from specdef.release.defend import DefendRequest, DefendResult, defend


@dataclass
class SpecDefDefenseConfig:
    """What TamperBench passes a defense (its two paths) and SpecDef's own hyperparameters.

    ``alpha`` and ``top_k`` have no default (no value is right for every model: the precision guard
    refuses what the dtype cannot hold); the rest are those of ``specdef defend``.
    """

    input_checkpoint_path: Path
    output_checkpoint_path: Path
    alpha: float
    top_k: int
    targets: str | tuple[str, ...] = "all-linear"
    exclude: tuple[str, ...] = ()
    mode: str = "algorithm1"
    dtype: str | None = None
    device: str | None = None
    method: str = "exact"
    seed: int = 0
    tolerance: float | None = None
    force: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.input_checkpoint_path = Path(self.input_checkpoint_path)
        self.output_checkpoint_path = Path(self.output_checkpoint_path)
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        self.exclude = tuple(self.exclude)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecDefDefenseConfig:
        """The config from a dict (TamperBench's YAML grids): every mandatory key present, no
        unknown key — each failure one line."""
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(data))
        unknown = sorted(set(data) - known)
        if missing:
            raise SpecdefError(f"SpecDef defense config: mandatory field(s) {missing} not given.")
        if unknown:
            raise SpecdefError(
                f"SpecDef defense config: {unknown} not a field; expected some of {sorted(known)}."
            )
        return cls(**data)

    def request(self) -> DefendRequest:
        """The :class:`specdef.release.defend.DefendRequest` this config stands for."""
        config = SpecDefConfig(
            alpha=self.alpha,
            top_k=self.top_k,
            targets=self.targets,
            exclude=self.exclude,
            method=self.method,
            seed=self.seed,
            tolerance=self.tolerance,
            force=self.force,
        )
        return DefendRequest(
            source=str(self.input_checkpoint_path),
            output=self.output_checkpoint_path,
            config=config,
            mode=self.mode,
            dtype=self.dtype,
            device=self.device,
            overwrite=self.overwrite,
        )


class SpecDefDefense:
    """TamperBench's ``AlignmentDefense`` shape: constructed from its config, ``run_defense()``
    writes the defended checkpoint and returns its path. ``result`` holds the full
    :class:`specdef.release.defend.DefendResult` (per-layer figures, output gap) afterwards."""

    name = "specdef"

    def __init__(self, defense_config: SpecDefDefenseConfig) -> None:
        self.defense_config = defense_config
        self.result: DefendResult | None = None

    def run_defense(self) -> Path:
        self.result = defend(self.defense_config.request())
        return self.result.output


def run_defense(
    input_checkpoint_path: str | os.PathLike[str],
    output_checkpoint_path: str | os.PathLike[str],
    **options: Any,
) -> Path:
    """Defend the Hugging Face model at ``input_checkpoint_path`` into ``output_checkpoint_path``
    and return that path; ``options`` are the other fields of :class:`SpecDefDefenseConfig`
    (``alpha`` and ``top_k`` required)."""
    data = {
        "input_checkpoint_path": input_checkpoint_path,
        "output_checkpoint_path": output_checkpoint_path,
        **options,
    }
    return SpecDefDefense(SpecDefDefenseConfig.from_dict(data)).run_defense()

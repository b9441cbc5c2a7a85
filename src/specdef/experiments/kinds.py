"""The experiment kinds: one runner per ``ExperimentConfig.kind``, each a function of one resolved
run returning the outcome fields of its results row (``docs/ARCHITECTURE.md``, "Results rows")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from specdef.experiments.relearn import run_relearn_kind
from specdef.experiments.runners import run_attack_kind, run_curvature_kind, run_utility_kind
from specdef.experiments.studies import run_detection_kind, run_landscape_kind

RUNNERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "attack": run_attack_kind,
    "curvature": run_curvature_kind,
    "utility": run_utility_kind,
    "detection": run_detection_kind,
    "landscape": run_landscape_kind,
    "relearn": run_relearn_kind,
}


def execute(run: Any) -> dict[str, Any]:
    """The outcome fields of one run of any kind."""
    return RUNNERS[run.kind](run)

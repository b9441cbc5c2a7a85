"""A searched model against its base: per rung of the threshold ladder, the fewest steps any trial
of each search needed, and the slowdown with its censoring — a pure function of the search rows.

The rungs are *absolute* and shared by both models: the searched threshold, then
:func:`~specdef.attack.metrics.ladder_thresholds` of its metric with loss fractions taken of the
**base** model's step-0 value (a defense that raises the starting loss must climb back to the
base's levels, not to fractions of its own higher start). Every trial that trained — complete or
pruned — is an observation: a pruned trial's rung steps are real, its censoring says "stopped early".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from specdef.attack.metrics import (
    Slowdown,
    StepsToThreshold,
    Threshold,
    best_of_trials,
    ladder_thresholds,
    slowdown,
    steps_to_threshold,
)


@dataclass(frozen=True)
class Best:
    """The best any trial did on one rung: its outcome (censored when no trial reached it: then
    the largest budget tried) and the trial number that reached it first (``None`` if none)."""

    outcome: StepsToThreshold | None
    trial: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, **(self.outcome.to_dict() if self.outcome else {})}


@dataclass(frozen=True)
class RungComparison:
    threshold: Threshold
    defended: Best
    base: Best
    slowdown: Slowdown | None  # None when a side has no trained trial

    def to_dict(self) -> dict[str, Any]:
        slow = self.slowdown
        return {
            "threshold": str(self.threshold),
            "defended": self.defended.to_dict(),
            "base": self.base.to_dict(),
            "slowdown": None if slow is None else slow.factor,
            "slowdown_relation": None if slow is None else slow.relation,
            "slowdown_text": "no trained trial" if slow is None else slow.text,
        }


def trained(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of trials that trained (attack rows with evaluations; failures are dropped)."""
    return [r for r in rows if r.get("kind", "attack") == "attack" and r.get("evals")]


def trial_outcome(row: Mapping[str, Any], threshold: Threshold) -> StepsToThreshold:
    """``threshold`` on one trial's recorded evaluations, censored as the loop censors it."""
    summary = row["summary"]
    stopped = summary.get("stopped_at")
    budget = int(stopped) if stopped is not None else int(row["spec"]["steps"])
    evals = [e for e in row["evals"] if threshold.metric in e]
    return steps_to_threshold(
        evals,
        threshold,
        budget=budget,
        diverged_at=summary.get("diverged_at"),
        stopped=stopped is not None,
    )


def best_trial(rows: Sequence[Mapping[str, Any]], threshold: Threshold) -> Best:
    """Fewest steps to ``threshold`` over the trials, the earlier trial on a tie
    (:func:`~specdef.attack.metrics.best_of_trials`: the rule of the search report pages too)."""
    ordered = sorted(trained(rows), key=lambda r: int(r["trial"]))
    index, outcome = best_of_trials([trial_outcome(r, threshold) for r in ordered])
    return Best(outcome, None if index is None else int(ordered[index]["trial"]))


def start_value(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    """``metric`` at step 0 (before any update; the same for every trial of one model)."""
    for row in trained(rows):
        for e in sorted(row["evals"], key=lambda e: int(e["step"])):
            if metric in e:
                return float(e[metric])
    return math.nan


def best_value(rows: Sequence[Mapping[str, Any]], metric: str, *, higher_is_better: bool) -> float:
    """The best finite ``metric`` any trial reached at any evaluation."""
    values = [
        float(e[metric])
        for r in trained(rows)
        for e in r["evals"]
        if metric in e and math.isfinite(float(e[metric]))
    ]
    if not values:
        return math.nan
    return max(values) if higher_is_better else min(values)


def rungs(threshold: Threshold, base_start: float) -> tuple[Threshold, ...]:
    """The searched threshold first, then the ladder of its metric (duplicates dropped)."""
    ladder = ladder_thresholds(threshold.metric, base_start) if math.isfinite(base_start) else ()
    out = [threshold]
    for rung in ladder:
        if all(not math.isclose(rung.value, t.value) for t in out):
            out.append(rung)
    return tuple(out)


def compare_searches(
    defended: Sequence[Mapping[str, Any]],
    base: Sequence[Mapping[str, Any]],
    threshold: Threshold,
) -> list[RungComparison]:
    """Per rung (:func:`rungs`), the defended model's and the base's best trial and the slowdown."""
    out = []
    for rung in rungs(threshold, start_value(base, threshold.metric)):
        d, b = best_trial(defended, rung), best_trial(base, rung)
        slow = slowdown(d.outcome, b.outcome) if d.outcome and b.outcome else None
        out.append(RungComparison(rung, d, b, slow))
    return out

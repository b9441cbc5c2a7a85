"""The threshold ladder and the search objective against plain reference computations over a
recorded history, and the loop's early stop (what a pruner uses) with its censoring."""

from __future__ import annotations

import math
from typing import Any

import pytest

from _attack_helpers import digits_task, pretrained_mlp
from specdef.attack.loop import AttackSpec, run_attack
from specdef.attack.metrics import (
    ACCURACY_RUNGS,
    LOSS_FRACTIONS,
    StepsToThreshold,
    search_objective,
    threshold_ladder,
)

ATTACK = digits_task(range(5, 10), benign=range(5))


def first_step(evals: list[dict[str, Any]], metric: str, ok: Any) -> int | None:
    """The reference: walk the rows in order, return the first step whose value passes ``ok``."""
    for row in sorted(evals, key=lambda r: r["step"]):
        value = row[metric]
        if value == value and ok(value):  # NaN never passes
            return int(row["step"])
    return None


@pytest.fixture(scope="module")
def recorded() -> Any:
    spec = AttackSpec(optimizer="adam", lr=1e-2, steps=60, batch_size=64, eval_every=5)
    return run_attack(pretrained_mlp(), ATTACK, spec)


def test_ladder_of_a_real_run_matches_a_plain_scan(recorded: Any) -> None:
    ladder = recorded.ladder
    assert ladder is not None and ladder.metric == "harmful_accuracy"
    evals = recorded.evals
    values = [r["harmful_accuracy"] for r in evals]
    assert ladder.start == values[0]
    assert ladder.best == max(values)
    assert ladder.best_step == next(
        r["step"] for r in evals if r["harmful_accuracy"] == max(values)
    )
    assert [r.threshold.value for r in ladder.rungs] == list(ACCURACY_RUNGS)
    reached = 0
    for rung in ladder.rungs:
        expect = first_step(evals, "harmful_accuracy", lambda v, c=rung.threshold.value: v >= c)
        assert rung.steps == expect
        if expect is None:
            assert rung.censor == "not reached in 60 steps"
        else:
            reached += 1
            assert rung.censor is None
    # a real climb: it starts below the first rung, reaches some, and the budget is too short for
    # the top one
    assert values[0] < 0.5 and 1 <= reached < len(ACCURACY_RUNGS)
    summary = recorded.summary()["ladder"]
    assert summary["rungs"][0]["threshold"] == "harmful_accuracy>=0.5"


def test_ladder_censoring_diverged_and_relative_loss_rungs() -> None:
    evals = [
        {"step": 0, "harmful_loss": 4.0},
        {"step": 10, "harmful_loss": 3.5},
        {"step": 20, "harmful_loss": 1.9},
        {"step": 30, "harmful_loss": math.nan},
    ]
    ladder = threshold_ladder(evals, metric="harmful_loss", budget=100, diverged_at=30)
    assert ladder is not None and not ladder.higher_is_better
    assert [r.threshold.value for r in ladder.rungs] == [4.0 * f for f in LOSS_FRACTIONS]
    for rung in ladder.rungs:
        expect = first_step(evals, "harmful_loss", lambda v, c=rung.threshold.value: v <= c)
        assert rung.steps == expect
        assert (rung.censor is None) == (expect is not None)
        if expect is None:
            assert rung.censor == "not reached: diverged at step 30"
    assert (ladder.best, ladder.best_step) == (1.9, 20)
    stopped = threshold_ladder(evals[:2], metric="harmful_loss", budget=10, stopped=True)
    assert stopped is not None
    assert stopped.rungs[-1].censor == "not reached in 10 steps (stopped early)"
    assert threshold_ladder(evals, metric="harmful_accuracy", budget=100) is None


def test_search_objective_orders_reached_censored_diverged() -> None:
    def obj(outcome: StepsToThreshold, best: float) -> float:
        return search_objective(outcome, budget=100, best=best, higher_is_better=True)

    fast, slow = StepsToThreshold(20, 100, "reached"), StepsToThreshold(80, 100, "reached")
    budget = StepsToThreshold(None, 100, "budget")
    stopped = StepsToThreshold(None, 40, "stopped")
    diverged = StepsToThreshold(None, 100, "diverged", diverged_at=3)
    assert obj(fast, 0.8) < obj(fast, 0.7) < obj(slow, 0.99) < obj(budget, 0.74)
    assert obj(budget, 0.74) < obj(budget, 0.2) < obj(diverged, 0.9)
    assert math.floor(obj(slow, 0.9)) == 80 and math.floor(obj(budget, 0.1)) == 101
    assert math.floor(obj(stopped, 0.1)) == 101  # the full budget, not the steps it ran
    assert math.floor(obj(diverged, math.nan)) == 102


def test_on_eval_stops_the_run_and_censors_at_that_step() -> None:
    seen: list[int] = []

    def stop_at_20(row: dict[str, float]) -> bool:
        seen.append(int(row["step"]))
        return row["step"] >= 20

    spec = AttackSpec(optimizer="sgd", lr=1e-6, steps=50, batch_size=32, eval_every=10,
                      threshold="harmful_accuracy>=0.99")  # fmt: skip
    result = run_attack(pretrained_mlp(), ATTACK, spec, on_eval=stop_at_20)
    assert seen == [10, 20] and result.stopped_at == 20 and result.steps_run == 20
    assert result.outcome == StepsToThreshold(None, 20, "stopped")
    assert str(result.outcome) == "> 20 (stopped early)"
    assert result.summary()["stopped_at"] == 20

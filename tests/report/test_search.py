"""The worst-case attacker's report section: per rung, each study's best trial (fewest steps),
the trials needed until the first success, the slowdown defended / undefended with its censoring
and spread over seeds, the stability-edge table, and the three figures — checked against numbers
computed by hand from hand-written rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specdef.attack.metrics import ACCURACY_RUNGS, Threshold, threshold_ladder
from specdef.attack.search.compare import best_trial
from specdef.report.page import build_report
from specdef.report.search import ANY, best_at, points_of, seeds_text, tables

BUDGET = 400


def trial(
    alpha: float | None,
    seed: int,
    number: int,
    reached: dict[float, int],
    *,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    state: str = "complete",
    diverged_at: int | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """A search trial row: ``reached`` maps a rung's accuracy to the first step it held."""
    rungs = [{"threshold": f"harmful_accuracy>={v:g}", "steps": reached.get(v),
              "censor": None if v in reached else f"not reached in {BUDGET} steps"}
             for v in ACCURACY_RUNGS]  # fmt: skip
    defense = {"alpha": alpha} if mode is None else {"alpha": alpha, "mode": mode}
    return {
        "run_id": f"{alpha}-{mode}-{optimizer}-{seed}-{number}",
        "experiment": "t", "kind": "attack", "model": "mlp-digits", "task": "digits-harmful",
        "alpha": alpha, "defense": defense, "defense_mode": mode if alpha else None,
        "optimizer": optimizer, "lr": lr, "seed": seed, "threshold": "harmful_accuracy>=0.9",
        "study": f"s-{alpha}-{mode}-{optimizer}-{seed}", "trial": number, "params": {"lr": lr},
        "trial_state": state, "objective": 1.0,
        "spec": {"steps": BUDGET, "eval_every": 10, "threshold": "harmful_accuracy>=0.9"},
        "summary": {"steps_to_threshold": reached.get(0.9), "budget": BUDGET,
                    "censored": 0.9 not in reached, "diverged_at": diverged_at,
                    "censor_reason": None if 0.9 in reached else "budget",
                    "steps_run": BUDGET, "ladder": {"metric": "harmful_accuracy", "rungs": rungs}},
    }  # fmt: skip


def rows() -> list[dict[str, Any]]:
    return [
        # undefended, seed 0: trial 1 is the first to succeed, trial 2 the best
        trial(None, 0, 0, {}, lr=1e-6),
        trial(None, 0, 1, {0.5: 30, 0.75: 60, 0.9: 100}, lr=0.1),
        trial(None, 0, 2, {0.5: 20, 0.75: 40, 0.9: 80}, lr=0.3),
        # undefended, seed 1
        trial(None, 1, 0, {0.5: 20, 0.75: 50, 0.9: 100}, lr=0.2),
        # defended, seed 0: 0.5 reached faster than undefended, 0.9 never
        trial(1e4, 0, 0, {}, lr=0.1, diverged_at=2),
        trial(1e4, 0, 1, {0.5: 10, 0.75: 120}, lr=1e-6),
        # defended, seed 1
        trial(1e4, 1, 0, {0.5: 60, 0.75: 200}, lr=1e-6),
        trial(1e4, 1, 1, {}, lr=1e-7, state="pruned"),
    ]


def test_best_trial_and_trials_needed_per_rung() -> None:
    undefended = [r for r in rows() if r["alpha"] is None and r["seed"] == 0]
    index = ACCURACY_RUNGS.index(0.75)
    best = best_at(undefended, index)
    assert (best.outcome.steps, best.trial, best.lr, best.first, best.trials) == (40, 2, 0.3, 2, 3)
    defended = [r for r in rows() if r["alpha"] == 1e4 and r["seed"] == 0]
    never = best_at(defended, ACCURACY_RUNGS.index(0.9))
    assert never.outcome.steps is None and never.outcome.budget == BUDGET and never.first is None


def test_best_at_agrees_with_the_baseline_comparison_on_accuracy_rungs() -> None:
    """The page reads each trial's recorded ladder, ``specdef attack --baseline`` recomputes from
    its evaluations: on accuracy rungs both pick the same trial and steps (one rule)."""

    def evaluated(number: int, accuracies: list[float], diverged_at: int | None = None) -> Any:
        evals = [{"step": 10 * i, "harmful_accuracy": a} for i, a in enumerate(accuracies)]
        ladder = threshold_ladder(evals, metric="harmful_accuracy", budget=BUDGET,
                                  diverged_at=diverged_at)  # fmt: skip
        assert ladder is not None
        row = trial(None, 0, number, {}, diverged_at=diverged_at)
        row["summary"].update(ladder=ladder.to_dict(), stopped_at=None)
        return {**row, "evals": evals}

    rows = [
        evaluated(2, [0.1, 0.55, 0.8, 0.92]),
        evaluated(0, [0.1, 0.3, 0.76, 0.8]),
        evaluated(1, [0.1, 0.6, 0.5], diverged_at=25),
        evaluated(3, [0.1, 0.2, 0.3, 0.4]),
    ]
    for index, value in enumerate(ACCURACY_RUNGS):
        page = best_at(rows, index)
        cli = best_trial(rows, Threshold("harmful_accuracy", value, True))
        assert cli.outcome is not None
        assert (page.trial, page.outcome.steps) == (cli.trial, cli.outcome.steps), value
        assert page.outcome.bound == cli.outcome.bound
    assert (best_at(rows, 0).trial, best_at(rows, 0).outcome.steps) == (1, 10)  # tie: trial 1 < 2
    assert best_at(rows, ACCURACY_RUNGS.index(0.95)).trial is None


def test_slowdown_per_rung_over_seeds_with_censoring() -> None:
    t = tables(rows())
    assert [r.label for r in t.rungs] == [f"harmful_accuracy ≥ {v:g}" for v in (0.5, 0.75, 0.9)]
    key = ("mlp-digits", "digits-harmful", (1e4, "algorithm1", None), "sgd")
    at = {r.label.split()[-1]: t.slow[(*key, r.index)] for r in t.rungs}
    # rung 0.5: seed 0 10/20, seed 1 60/20 — measured, median 1.75 (0.5–3)
    assert [(s.relation, s.factor) for s in at["0.5"]] == [("=", 0.5), ("=", 3.0)]
    assert seeds_text(at["0.5"]) == "1.75× (0.5–3)"
    # rung 0.75: 120/40 and 200/50
    assert [s.factor for s in at["0.75"]] == [3.0, 4.0]
    # rung 0.9: the defended searches never reached it: lower bounds 400/80 and 400/100
    assert [(s.relation, s.factor) for s in at["0.9"]] == [(">", 5.0), (">", 4.0)]
    assert seeds_text(at["0.9"]).startswith("> 4.5× (4–5); 2/2 censored")
    # with one optimizer the attacker's pick is that optimizer
    anyone = ("mlp-digits", "digits-harmful", (1e4, "algorithm1", None), ANY)
    assert [s.factor for s in t.slow[(*anyone, t.rungs[1].index)]] == [3.0, 4.0]


def test_points_mark_reached_censored_pruned_and_diverged() -> None:
    kinds = {(p.variant, p.lr): p.kind for p in points_of(rows(), ACCURACY_RUNGS.index(0.75))}
    assert kinds[("undefended", 0.3)] == "reached" and kinds[("undefended", 1e-6)] == "budget"
    assert kinds[("α=1e+04", 0.1)] == "diverged" and kinds[("α=1e+04", 1e-7)] == "pruned"


def test_report_section_tables_and_figures(tmp_path: Path) -> None:
    edge = {"kind": "stability-edge", "model": "mlp-digits", "task": "digits-harmful",
            "alpha": 1e4, "defense": {"alpha": 1e4}, "defense_mode": "algorithm1",
            "optimizer": "sgd", "seed": 0,
            "stability_edge": {"edge": 1e-8, "ceiling": 1e-10, "lr_min": 1e-12}}  # fmt: skip
    report = build_report([*rows(), edge], tmp_path)
    text = report.markdown
    assert "Worst-case attacker" in text and "unknown kind" not in text
    assert "| α=1e+04 | sgd | 1.75× (0.5–3) | 3.5× (3–4) | > 4.5× (4–5); 2/2 censored" in text
    # best steps per seed with [trials until the first success / trials]
    assert "| undefended | sgd | 20 [2/3], 20 [1/1] |" in text
    assert "| α=1e+04 | sgd | 10 [2/2], 60 [1/2] |" in text
    # the edge: 1e-8 against the undefended best lr at the top rung (0.3 and 0.2: median 0.25)
    assert "| α=1e+04 | sgd | 1.00e-08 | 1/1 | 1.00e-10 | 100 | 0.25 | 7.4 |" in text
    names = {p.name for p in report.figures}
    assert names == {"search0_slowdown.png", "search0_steps_vs_lr.png", "search0_heatmap.png"}
    assert all((tmp_path / n).stat().st_size > 10_000 for n in names)


def test_native_is_its_own_variant() -> None:
    t = tables([*rows(), trial(1e4, 0, 0, {0.5: 40}, mode="native")])
    assert t.variants == [(None, None, None), (1e4, "algorithm1", None), (1e4, "native", None)]
    native = ("mlp-digits", "digits-harmful", (1e4, "native", None), "sgd", t.rungs[0].index)
    assert [s.factor for s in t.slow[native]] == [2.0]  # 40 / 20, seed 0 only


def test_every_registered_optimizer_has_one_class() -> None:
    from specdef.attack.optim import OPTIMIZERS
    from specdef.report.search import OPTIMIZER_CLASSES

    assert set(OPTIMIZER_CLASSES) == set(OPTIMIZERS)


def test_a_class_is_the_best_of_its_optimizers_on_both_models(tmp_path: Path) -> None:
    """Per seed the class's fewest steps on each model (the attacker picks within the class): the
    undefended best and the defended best may come from different optimizers."""
    adam = [trial(None, 0, 0, {0.5: 20}, optimizer="adam"), trial(1e4, 0, 0, {0.5: 90},
            optimizer="adam")]  # fmt: skip
    adagrad = [trial(None, 0, 0, {0.5: 40}, optimizer="adagrad"),
               trial(1e4, 0, 0, {0.5: 60}, optimizer="adagrad")]  # fmt: skip
    sgd = [trial(None, 0, 0, {0.5: 30}, optimizer="sgd"), trial(1e4, 0, 0, {}, optimizer="sgd")]
    t = tables([*adam, *adagrad, *sgd])
    assert t.classes == ["class: first-order", "class: adaptive"]
    key = ("mlp-digits", "digits-harmful", (1e4, "algorithm1", None))
    rung = t.rungs[0].index
    adaptive = t.slow[(*key, "class: adaptive", rung)]
    assert [(s.relation, s.factor) for s in adaptive] == [("=", 3.0)]  # 60 (adagrad) / 20 (adam)
    first = t.slow[(*key, "class: first-order", rung)]
    assert [(s.relation, s.factor) for s in first] == [(">", BUDGET / 30)]
    text = build_report([*adam, *adagrad, *sgd], tmp_path).markdown
    assert "| α=1e+04 | adaptive (adam, adagrad) | 3× |" in text
    assert (tmp_path / "search0_slowdown_by_class.png").stat().st_size > 10_000

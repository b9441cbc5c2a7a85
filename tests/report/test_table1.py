"""The Table 1 sections against hand-written relearn rows: seeds side by side, censoring kept, and
the slowdown ladder as :func:`specdef.attack.metrics.slowdown` states it."""

from __future__ import annotations

from typing import Any

from specdef.report.table1 import slowdown_ladder, table1_section


def outcome(steps: int | None, *, budget: int = 200, diverged: int | None = None) -> dict[str, Any]:
    reason = None if steps is not None else ("diverged" if diverged is not None else "budget")
    return {"steps_to_threshold": steps, "censored": steps is None, "censor_reason": reason,
            "budget": budget, "diverged_at": diverged}  # fmt: skip


def row(name: str, seed: int, grid: int | None, rungs: list[int | None]) -> dict[str, Any]:
    names = ["harmful_accuracy>=0.75", "harmful_accuracy>=0.5"]
    return {
        "kind": "relearn", "defense_name": name, "seed": seed, "model": "mlp-digits",
        "task": "digits-harmful", "threshold": names[0],
        "attack": {"optimizer": "adam", "steps": 200},
        "utility": {"source": {"benign_accuracy": 0.99, "harmful_accuracy": 0.0},
                    "defended": {"benign_accuracy": 0.98, "harmful_accuracy": 0.0}},
        "grid": [{"lr": 1e-3, **outcome(grid, diverged=None if grid else 3), "best": 0.5}],
        "search": {"trials": 4, "best": {"lr": 1e-3, **outcome(rungs[0]), "best": 0.8},
                   "rungs": [{"threshold": t, "trial": 0, **outcome(s)}
                             for t, s in zip(names, rungs, strict=True)]},
    }  # fmt: skip


ROWS = [
    row("none", 0, 20, [20, 10]),
    row("none", 1, 30, [30, 10]),
    row("specdef", 0, None, [None, 40]),
    row("specdef", 1, None, [170, 30]),
]


def test_seeds_side_by_side_and_censoring() -> None:
    text = table1_section(ROWS)
    assert (
        "| none | 0 · 0 | 20 / 0.5 · 30 / 0.5 | 20 / 0.8 (lr 0.001) · 30 / 0.8 (lr 0.001) |" in text
    )
    assert "| specdef | 0 · 0 | div. / 0.5 · div. / 0.5 |" in text
    assert "0.99 · 0.99 → 0.98 · 0.98" in text


def test_slowdown_ladder_states_bounds() -> None:
    groups = {"none": {0: ROWS[0], 1: ROWS[1]}, "specdef": {0: ROWS[2], 1: ROWS[3]}}
    text = slowdown_ladder(groups)
    # seed 0: never reached in 200 vs 20 → > 10×; seed 1: 170 vs 30 → 5.67×
    assert "| specdef | >200 (>10×) · 170 (5.67×) | 40 (4×) · 30 (3×) |" in text
    assert "| none | 20 · 30 | 10 · 10 |" in text


def test_each_model_is_its_own_table_against_its_own_undefended_model() -> None:
    other = [{**row("none", 0, 0, [0, 0]), "model": "mlp-digits10"},
             {**row("specdef", 0, None, [10, 0]), "model": "mlp-digits10"}]  # fmt: skip
    text = table1_section(ROWS + other)
    first, second = text.split("**mlp-digits10**")
    assert first.startswith("**mlp-digits**") and "mlp-digits10" not in first
    assert "| specdef | >200 (>10×) · 170 (5.67×) | 40 (4×) · 30 (3×) |" in first
    # against mlp-digits10's undefended model, which starts above the threshold: undefined
    assert "| specdef | 10 (undef.) | 0 (undef.) |" in second
    assert not table1_section(ROWS).startswith("**")

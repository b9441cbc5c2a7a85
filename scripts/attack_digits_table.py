"""The digits experiment of ``docs/attacks.md``: the zoo's ``mlp-digits`` (MLP 64-128-128-10,
pretrained on digits 0–4) fine-tuned on digits 5–9 (``digits-harmful``) by every optimizer class,
undefended and defended with α = 1e4, plus the ablations that explain the outcome. Rewrites the
text between the ``digits-table`` markers of ``docs/attacks.md``.

    .venv/bin/python scripts/attack_digits_table.py      # ≈ 5 min on 2 shared cores

Rows go to ``runs/attack_digits/results.jsonl`` (resumable; delete it to re-measure).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef import zoo
from specdef.attack.loop import AttackSpec
from specdef.attack.metrics import StepsToThreshold, best_over_grid, slowdown
from specdef.attack.sweep import ModelVariant, run_sweep
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import defended_layers
from specdef.utils.files import replace_marked_region

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "attacks.md"
RESULTS = ROOT / "runs" / "attack_digits" / "results.jsonl"
START, END = "<!-- digits-table:start -->", "<!-- digits-table:end -->"
THRESHOLD = "harmful_accuracy>=0.9"
BASE = AttackSpec(
    steps=300, batch_size=64, eval_every=5, threshold=THRESHOLD, stop_at_threshold=True
)
GRID: dict[str, tuple[float, ...]] = {
    "adam": (1e-4, 1e-3, 1e-2, 1e-1),
    "sgd": (1e-3, 1e-2, 1e-1, 1.0),
    "muon": (1e-3, 1e-2, 1e-1),
    "adahessian": (1e-4, 1e-3, 1e-2, 1e-1),
    "sophiah": (1e-1, 1.0),
    "newton-cg": (0.1, 1.0),
}
MIDDLE = SpecDefConfig(alpha=1e4, top_k=8, targets=("layers.2",))
ALL = SpecDefConfig(alpha=1e4, top_k=8, targets="all-linear")


def _builder(config: SpecDefConfig | None) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = zoo.load_model("mlp-digits")
        if config is not None:
            apply_specdef_(model, config)
        return model

    return build


def _compensations(config: SpecDefConfig) -> tuple[str, ...]:
    model = _builder(config)()
    return tuple(f"{name}.compensation" for name in defended_layers(model))


def main() -> int:
    torch.set_num_threads(1)
    task = zoo.load_task("digits-harmful")
    specs = [dataclasses.replace(BASE, optimizer=o, lr=lr) for o, lrs in GRID.items() for lr in lrs]
    main_variants = [
        ModelVariant("undefended", _builder(None)),
        ModelVariant(
            "α=1e4 layers.2", _builder(MIDDLE), {"alpha": 1e4, "defense": MIDDLE.to_dict()}
        ),
        ModelVariant("α=1e4 all-linear", _builder(ALL), {"alpha": 1e4, "defense": ALL.to_dict()}),
    ]
    rows = run_sweep(task, main_variants, specs, results=RESULTS, experiment="digits").rows
    # Ablations with Adam and SGD: which parameters make the defended model untrainable?
    first_order = [s for s in specs if s.optimizer in ("adam", "sgd")]
    frozen_c = [dataclasses.replace(s, frozen=_compensations(ALL)) for s in first_order]
    untouched = [dataclasses.replace(s, train="untouched") for s in first_order]
    same_params = [dataclasses.replace(s, frozen=("layers.2",)) for s in first_order]
    ablations = [
        (main_variants[2], frozen_c, "α=1e4 all-linear, compensation frozen"),
        (main_variants[1], untouched, "α=1e4 layers.2, untouched only"),
        (main_variants[0], same_params, "undefended, layers.2 frozen"),
    ]
    ablation_rows: dict[str, list[dict[str, Any]]] = {}
    for variant, variant_specs, label in ablations:
        ablation_rows[label] = run_sweep(
            task, [variant], variant_specs, results=RESULTS, experiment="digits-ablation"
        ).rows
    text = render(rows, [v.name for v in main_variants], ablation_rows)
    print(text)
    replace_marked_region(DOC, START, END, "\n" + text)
    return 0


def outcome(row: dict[str, Any]) -> StepsToThreshold:
    return StepsToThreshold.from_dict(row["summary"])


def _table(
    by_column: dict[str, list[dict[str, Any]]],
) -> tuple[list[str], dict[str, dict[tuple[str, float], StepsToThreshold]]]:
    cells = {
        col: {(r["optimizer"], float(r["lr"])): outcome(r) for r in rows}
        for col, rows in by_column.items()
    }
    keys = sorted(
        {k for c in cells.values() for k in c}, key=lambda k: (list(GRID).index(k[0]), k[1])
    )
    lines = [
        "| optimizer | lr | " + " | ".join(by_column) + " |",
        "|---|---|" + "---|" * len(by_column),
    ]
    for opt, lr in keys:
        vals = [str(cells[c].get((opt, lr), "—")) for c in by_column]
        lines.append(f"| {opt} | {lr:g} | " + " | ".join(vals) + " |")
    return lines, cells


def render(
    rows: list[dict[str, Any]], names: list[str], ablations: dict[str, list[dict[str, Any]]]
) -> str:
    by_column = {n: [r for r in rows if r["model"] == n] for n in names}
    lines = [
        f"Steps to {THRESHOLD} on held-out digits 5–9 (budget {BASE.steps} steps, batch "
        f"{BASE.batch_size}, evaluated every {BASE.eval_every}; `> N` = not reached, right-censored; "
        "`never (diverged at s)` = training loss became NaN/Inf or exceeded 10× its first value "
        "at step s). Regenerate with `.venv/bin/python scripts/attack_digits_table.py`.",
        "",
    ]
    table, cells = _table(by_column)
    lines += table
    lines += ["", "| optimizer | defended model | best undefended | best defended | slowdown |"]
    lines += ["|---|---|---|---|---|"]
    for opt in GRID:
        lr_u, u = best_over_grid({lr: o for (o_, lr), o in cells[names[0]].items() if o_ == opt})
        for name in names[1:]:
            lr_d, d = best_over_grid({lr: o for (o_, lr), o in cells[name].items() if o_ == opt})
            if u is None or d is None:
                continue
            lines.append(
                f"| {opt} | {name} | {u}{f' (lr {lr_u:g})' if lr_u else ''} | "
                f"{d}{f' (lr {lr_d:g})' if lr_d else ''} | {slowdown(d, u).text} |"
            )
    lines += ["", "Ablations (Adam and SGD, same grid):", ""]
    table, _ = _table(ablations)
    lines += table
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

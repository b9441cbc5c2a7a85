"""The optimizer-grid section of ``docs/attacks.md`` ("Every optimizer class on the digits MLP"):
steps to the threshold per optimizer × learning rate for each model variant, the attacker's best
learning rate and the slowdown per defended variant, and the ablations (runs that freeze
parameters or train a subset). A pure function of ``attack`` rows; imports no training code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specdef.attack.metrics import StepsToThreshold, best_over_grid, slowdown
from specdef.report.markdown import Row

OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD", "adamw": "AdamW"}  # as prose writes them


def _alpha(alpha: float) -> str:
    mantissa, _, exponent = f"{alpha:.0e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def column(row: Row) -> tuple[str, bool]:
    """``(label, ablation)``: ``undefended`` or ``α=1e4 <targets>``, then what the attack leaves
    out (``compensation frozen``, ``untouched only``, ``<names> frozen``)."""
    defense = row.get("defense") or {}
    alpha = defense.get("alpha")
    if alpha is None:
        label = "undefended"
    else:
        targets = defense.get("targets", "all-linear")
        names = targets if isinstance(targets, str) else ",".join(targets)
        label = f"α={_alpha(alpha)} {names}"
    attack = row.get("attack") or {}
    frozen = list(attack.get("frozen") or ())
    extras = []
    if frozen and all(str(f).endswith(".compensation") for f in frozen):
        extras.append("compensation frozen")
    elif frozen:
        extras.append(f"{','.join(map(str, frozen))} frozen")
    if attack.get("train") == "untouched":
        extras.append("untouched only")
    return ", ".join([label, *extras]), bool(extras)


def _outcome(row: Row) -> StepsToThreshold:
    return StepsToThreshold.from_dict(row["summary"])


def _table(
    by_column: dict[str, list[Row]], optimizers: Sequence[str]
) -> tuple[list[str], dict[str, dict[tuple[str, float], StepsToThreshold]]]:
    cells = {
        col: {(str(r["optimizer"]), float(r["lr"])): _outcome(r) for r in rows}
        for col, rows in by_column.items()
    }
    keys = sorted(
        {k for c in cells.values() for k in c}, key=lambda k: (optimizers.index(k[0]), k[1])
    )
    lines = [
        "| optimizer | lr | " + " | ".join(by_column) + " |",
        "|---|---|" + "---|" * len(by_column),
    ]
    for opt, lr in keys:
        vals = [str(cells[c].get((opt, lr), "—")) for c in by_column]
        lines.append(f"| {opt} | {lr:g} | " + " | ".join(vals) + " |")
    return lines, cells


def optimizer_grid_section(rows: Sequence[Row]) -> str:
    """The three tables: steps per optimizer × lr, best-lr slowdown, ablations."""
    rows = [r for r in rows if r.get("kind") == "attack"]
    if not rows:
        return "_Not run yet._\n"
    labelled = [(column(r), r) for r in rows]
    main: dict[str, list[Row]] = {}
    ablations: dict[str, list[Row]] = {}
    for (label, ablation), r in labelled:
        (ablations if ablation else main).setdefault(label, []).append(r)
    optimizers = list(dict.fromkeys(str(r["optimizer"]) for r in rows))
    spec: dict[str, Any] = rows[0]["attack"]
    lines = [
        f"Steps to {spec.get('threshold')} on held-out digits 5–9 (budget {spec.get('steps')} steps, "
        f"batch {spec.get('batch_size')}, evaluated every {spec.get('eval_every')}; `> N` = not "
        "reached, right-censored; `never (diverged at s)` = training loss became NaN/Inf or "
        "exceeded 10× its first value at step s).",
        "",
    ]
    table, cells = _table(main, optimizers)
    lines += table
    names = list(main)
    lines += ["", "| optimizer | defended model | best undefended | best defended | slowdown |"]
    lines += ["|---|---|---|---|---|"]
    for opt in optimizers:
        lr_u, u = best_over_grid({lr: o for (o_, lr), o in cells[names[0]].items() if o_ == opt})
        for name in names[1:]:
            lr_d, d = best_over_grid({lr: o for (o_, lr), o in cells[name].items() if o_ == opt})
            if u is None or d is None:
                continue
            lines.append(
                f"| {opt} | {name} | {u}{f' (lr {lr_u:g})' if lr_u else ''} | "
                f"{d}{f' (lr {lr_d:g})' if lr_d else ''} | {slowdown(d, u).text} |"
            )
    if ablations:
        used = dict.fromkeys(str(r["optimizer"]) for group in ablations.values() for r in group)
        named = " and ".join(OPTIMIZER_NAMES.get(o, o) for o in used)
        lines += ["", f"Ablations ({named}, same grid):", ""]
        table, _ = _table(ablations, optimizers)
        lines += table
    return "\n".join(lines) + "\n"

"""The attack-grid sections of hand-written pages. ``optimizer-grid`` (docs/attacks.md, "Every optimizer class on
the digits MLP"): steps to the threshold per optimizer × learning rate for each model variant, the
attacker's best learning rate and the slowdown per defended variant, and the ablations (runs that
freeze parameters or train a subset). ``lora-targets`` ("LoRA on a defended tiny Llama"): the same
per LoRA target set. ``ladder`` (docs/theory.md §8): the first step of each threshold rung per
run. Pure functions of ``attack`` rows; they import no training code."""

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


def _best(outcome: StepsToThreshold, lr: float | None) -> str:
    """A best-over-grid cell: the outcome and the learning rate that reached it."""
    return f"{outcome}{f' (lr {lr:g})' if lr else ''}"


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
                f"| {opt} | {name} | {_best(u, lr_u)} | {_best(d, lr_d)} | {slowdown(d, u).text} |"
            )
    if ablations:
        used = dict.fromkeys(str(r["optimizer"]) for group in ablations.values() for r in group)
        named = " and ".join(OPTIMIZER_NAMES.get(o, o) for o in used)
        lines += ["", f"Ablations ({named}, same grid):", ""]
        table, _ = _table(ablations, optimizers)
        lines += table
    return "\n".join(lines) + "\n"


def _lora_label(row: Row) -> str:
    targets = row.get("lora_targets") or ["all-linear"]
    return "all-linear" if list(targets) == ["all-linear"] else "attention-only"


def _pretrain_note(rows: Sequence[Row]) -> str:
    """The held-out losses the runs' ``data.pretrain`` reached (every split), or ``""``."""
    found = [r["pretrain"] for r in rows if r.get("pretrain")]
    if not found:
        return ""
    task = rows[0].get("data", {}).get("pretrain_task", "its task")
    keys = sorted(k for k in found[0] if k.endswith("_loss"))
    ranges = []
    for key in keys:
        low, high = min(f[key] for f in found), max(f[key] for f in found)
        value = f"{low:.2g}" if f"{low:.2g}" == f"{high:.2g}" else f"{low:.2g} … {high:.2g}"
        ranges.append(f"{key.removesuffix('_loss')} {value}")
    return (
        f" Each run first pretrains the model on {task} (held-out loss after pretraining: "
        + ", ".join(ranges)
        + ")."
    )


def lora_section(rows: Sequence[Row]) -> str:
    """The LoRA study of ``docs/attacks.md``: steps to the threshold per LoRA target set × model
    (undefended, defended) × learning rate, the trainable-parameter count, then the attacker's best
    learning rate and the slowdown per target set."""
    rows = [r for r in rows if r.get("kind") == "attack" and r.get("train") == "lora"]
    if not rows:
        return "_Not run yet._\n"
    spec: dict[str, Any] = rows[0]["attack"]
    lrs = sorted({float(r["lr"]) for r in rows})
    targets = list(dict.fromkeys(_lora_label(r) for r in rows))
    cells: dict[tuple[str, bool], dict[float, StepsToThreshold]] = {}
    trainable: dict[tuple[str, bool], int] = {}
    alphas = {}
    for r in rows:
        key = (_lora_label(r), r.get("alpha") is not None)
        cells.setdefault(key, {})[float(r["lr"])] = _outcome(r)
        trainable[key] = int(r["summary"]["trainable_parameters"])
        if r.get("alpha") is not None:
            alphas[key] = f"α = {_alpha(float(r['alpha']))}"
    lines = [
        f"Steps to {spec.get('threshold')} on held-out language-H sequences "
        f"({OPTIMIZER_NAMES.get(str(spec.get('optimizer')), spec.get('optimizer'))}, LoRA r = "
        f"{spec.get('lora_rank')}, batch {spec.get('batch_size')}, evaluated every "
        f"{spec.get('eval_every')} steps, budget {spec.get('steps')}; `> N` = not reached, "
        "right-censored)." + _pretrain_note(rows),
        "",
        "| LoRA targets | model | trainable | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|---|---|" + "---|" * len(lrs),
    ]
    for name in targets:
        for defended in (False, True):
            if (name, defended) not in cells:
                continue
            label = alphas.get((name, defended), "undefended")
            steps = [str(cells[(name, defended)].get(lr, "—")) for lr in lrs]
            lines.append(
                f"| {name} | {label} | {trainable[(name, defended)]:,} | "
                + " | ".join(steps)
                + " |"
            )
    lines += [
        "",
        "| LoRA targets | best undefended | best defended | slowdown |",
        "|---|---|---|---|",
    ]
    for name in targets:
        if (name, False) not in cells or (name, True) not in cells:
            continue
        lr_u, u = best_over_grid(cells[(name, False)])
        lr_d, d = best_over_grid(cells[(name, True)])
        if u is None or d is None:
            continue
        lines.append(f"| {name} | {_best(u, lr_u)} | {_best(d, lr_d)} | {slowdown(d, u).text} |")
    return "\n".join(lines) + "\n"


def ladder_section(rows: Sequence[Row]) -> str:
    """One line per run (α, seed): the first evaluated step at which each rung of the threshold
    ladder was reached (``—`` = never), the best value and the step training diverged at, if any
    (docs/theory.md §8, damped K-FAC on mlp-digits)."""
    rows = [r for r in rows if r.get("kind") == "attack" and (r.get("summary") or {}).get("ladder")]
    if not rows:
        return "_Not run yet._\n"
    rows = sorted(rows, key=lambda r: (r.get("alpha") or 0.0, int(r.get("seed", 0))))
    rungs = [str(x["threshold"]).split(">=")[-1] for x in rows[0]["summary"]["ladder"]["rungs"]]
    lines = [
        "| α | seed | " + " | ".join(f"steps to ≥ {r}" for r in rungs) + " | best | diverged |",
        "|---|---|" + "---|" * len(rungs) + "---|---|",
    ]
    for r in rows:
        ladder = r["summary"]["ladder"]
        steps = {str(x["threshold"]).split(">=")[-1]: x["steps"] for x in ladder["rungs"]}
        cells = [str(steps[k]) if steps.get(k) is not None else "—" for k in rungs]
        label = "undefended" if r.get("alpha") is None else f"{float(r['alpha']):g}"
        diverged = r["summary"].get("diverged_at")
        lines.append(
            f"| {label} | {r.get('seed', 0)} | "
            + " | ".join(cells)
            + f" | {ladder['best']:.3f} | {'no' if diverged is None else diverged} |"
        )
    return "\n".join(lines) + "\n"

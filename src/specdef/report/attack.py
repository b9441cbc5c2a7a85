"""Attack sections of :mod:`specdef.report.page`: rows of ``kind: "attack"`` grouped by condition and by
the model variant the attacker faces, then tables of steps to the threshold, the attacker's best
learning rate and slowdown, benign utility before / after, and the informed attacks' parameter cost,
with a loss-curve figure per condition. Imports no training code."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from specdef.attack.metrics import Threshold
from specdef.report import plots as report_plots
from specdef.report.markdown import (
    Report,
    Row,
    alpha_key,
    alpha_label,
    fmt_num,
    md_table,
    row_alpha,
)

# Fields that split attack rows into separate tables (one table per combination that occurs).
CONDITION_KEYS = ("model", "task", "lora_targets")
# Fields that, with alpha, make the *columns* of a table: the model variants the attacker faces.
VARIANT_KEYS = ("adaptive", "train")
# Defense fields shown in a column's label when they vary among the defended runs.
DEFENSE_EXTRAS = ("mode", "targets", "top_k", "preset")


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def condition(row: Row) -> tuple[Any, ...]:
    """The values of :data:`CONDITION_KEYS` of an attack row."""
    return tuple(_hashable(row.get(k)) for k in CONDITION_KEYS)


Variant = tuple[Any, ...]  # (alpha, adaptive, train, defense extras...)


def variant(row: Row) -> Variant:
    """What the attacker faces: α, the informed transform, which parameters train, and the
    defense fields of :data:`DEFENSE_EXTRAS`."""
    alpha = row_alpha(row)
    defense = row.get("defense") or {}
    train = str(row.get("train") or "all")
    adaptive = row.get("adaptive") or None
    frozen = (
        (row.get("attack") or {}).get("frozen") if isinstance(row.get("attack"), dict) else None
    )
    if frozen:  # a subset chosen by the experiment (not by an informed transform)
        train = f"{'all' if train == 'all' else train} but {','.join(map(str, frozen))}"
    extras = tuple(_hashable(defense.get(k)) if alpha is not None else None for k in DEFENSE_EXTRAS)
    return (alpha, adaptive, None if train == "all" else train, *extras)


def _variant_sort(v: Variant) -> tuple[Any, ...]:
    return (v[0] is not None, v[1] is not None or v[2] is not None, alpha_key(v[0]), str(v[1:]))


def variant_label(v: Variant, extras_vary: Sequence[bool] = ()) -> str:
    text = alpha_label(v[0])
    if v[1]:
        text += f" + {v[1]}"
    if v[2]:
        text += f" (train {v[2]})"
    for name, value, show in zip(DEFENSE_EXTRAS, v[3:], extras_vary, strict=False):
        if show and value is not None:
            text += f", {name}={value}"
    return text


def normalize(row: Row) -> Row:
    """Flatten an attack row written from :class:`specdef.attack.loop.AttackResult` (``spec`` and
    ``summary`` blocks, ``evals`` list, ``threshold`` as ``"metric<=value"``) into the flat fields
    this module reads; fields already at the top level win."""
    out = dict(row)
    for section in ("spec", "summary"):
        block = row.get(section)
        if isinstance(block, dict):
            for key, value in block.items():
                out.setdefault(key, value)
    threshold = out.get("threshold")
    if isinstance(threshold, str):
        parsed = Threshold.parse(threshold, task_kind=str(out.get("task_kind", "classification")))
        out["threshold"] = parsed.value
        out.setdefault("metric", parsed.metric)
    evals = out.get("evals")
    if isinstance(evals, list) and evals:
        for name, index in (("before", 0), ("after", -1)):
            if name not in out:
                out[name] = {k: v for k, v in evals[index].items() if k.startswith("benign")}
    if out.get("steps") is None and out.get("budget") is not None:
        out["steps"] = out["budget"]
    return out


# ---- tables -----------------------------------------------------------------------------------


def steps_cell(rows: Sequence[Row]) -> str:
    """Seeds of one (condition, α, optimizer, lr): median steps to threshold among those that
    reached it, how many reached it, and divergence (``>N`` when none reached it in N steps)."""
    n = len(rows)
    reached = [
        int(r["steps_to_threshold"])
        for r in rows
        if r.get("steps_to_threshold") is not None and not r.get("censored", False)
    ]
    diverged = [r["diverged_at"] for r in rows if r.get("diverged_at") is not None]
    budget = max(int(r.get("steps") or 0) for r in rows)
    if reached:
        text = f"{statistics.median(reached):g}"
        if len(reached) < n:
            text += f" ({len(reached)}/{n})"
    else:
        text = f">{budget}"
    if diverged:
        text += f", diverged@{int(statistics.median(diverged))} ({len(diverged)}/{n})"
    return text


def _median_steps(rows: Sequence[Row]) -> float:
    """Median steps with censored / diverged runs counted as never (inf)."""
    values = [
        float(r["steps_to_threshold"])
        if r.get("steps_to_threshold") is not None and not r.get("censored", False)
        else math.inf
        for r in rows
    ]
    return statistics.median(values) if values else math.inf


def _group(rows: Iterable[Row]) -> dict[tuple[str, float, Variant], list[Row]]:
    out: dict[tuple[str, float, Variant], list[Row]] = defaultdict(list)
    for r in rows:
        out[(str(r.get("optimizer")), float(r.get("lr") or 0.0), variant(r))].append(r)
    return out


def attack_sections(rows: list[Row], out_dir: Path, report: Report) -> list[str]:
    """Markdown sections for attack rows: one table set and figure per condition."""
    conds = [condition(r) for r in rows]
    varying = [i for i, _ in enumerate(CONDITION_KEYS) if len({c[i] for c in conds}) > 1]
    by_cond: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for r, c in zip(rows, conds, strict=True):
        by_cond[tuple(c[i] for i in varying)].append(r)
    parts = []
    for index, (key, group) in enumerate(sorted(by_cond.items(), key=lambda kv: str(kv[0]))):
        label = ", ".join(
            f"{CONDITION_KEYS[i]}={_show(v)}" for i, v in zip(varying, key, strict=True)
        )
        parts.append(
            _attack_condition(group, label or "all runs", out_dir, f"attack{index}", report)
        )
    return parts


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _attack_condition(rows: list[Row], label: str, out_dir: Path, stem: str, report: Report) -> str:
    metric = rows[0].get("metric", "harmful_loss")
    threshold = rows[0].get("threshold")
    variants = sorted({variant(r) for r in rows}, key=_variant_sort)
    defended = [v for v in variants if v[0] is not None]
    extras_vary = [len({v[3 + i] for v in defended}) > 1 for i in range(len(DEFENSE_EXTRAS))]
    names = {v: variant_label(v, extras_vary) for v in variants}
    optimizers = sorted({str(r.get("optimizer")) for r in rows})
    lrs = sorted({float(r.get("lr") or 0.0) for r in rows})
    cells = _group(rows)
    budget = max(int(r.get("steps") or 0) for r in rows)
    lines = [f"### Attack: {label}\n"]
    lines.append(
        f"Threshold: held-out `{metric}` {'≥' if 'acc' in str(metric) else '≤'} "
        f"{fmt_num(threshold)}; budget {budget} steps; {len({r.get('seed') for r in rows})} "
        "seed(s). Cells: median steps to the threshold over seeds (k/n reached); `>N` = never "
        "reached in N steps (right-censored); `diverged@s` = the loss became NaN/Inf or exploded "
        "at step s (median over the runs that diverged).\n"
    )
    table = [
        [
            opt,
            fmt_num(lr),
            *(steps_cell(cells[(opt, lr, v)]) if (opt, lr, v) in cells else "—" for v in variants),
        ]
        for opt in optimizers
        for lr in lrs
        if any((opt, lr, v) in cells for v in variants)
    ]
    lines.append(md_table(["optimizer", "lr", *(names[v] for v in variants)], table))
    report.tables.append(f"{stem}: steps to threshold")
    lines.append(
        "\n**Attacker's best learning rate** (fewest median steps over the grid) and the "
        "slowdown against the undefended model's best:\n"
    )
    best_rows = []
    for opt in optimizers:
        best: dict[Variant, tuple[float, float | None]] = {}
        for v in variants:
            options = [
                (_median_steps(cells[(opt, lr, v)]), lr) for lr in lrs if (opt, lr, v) in cells
            ]
            if options:
                best[v] = min(options, key=lambda t: t[0])
        base = next(
            (best[v][0] for v in best if v[0] is None and v[1] is None and v[2] is None), math.inf
        )
        for v, (steps, lr) in best.items():
            if v == (None, None, None, *v[3:]) or not math.isfinite(base):
                slow = "—"
            elif math.isinf(steps):
                slow = f">{budget / base:.3g}× (censored at {budget})"
            else:
                slow = f"{steps / base:.3g}×"
            shown = f">{budget}" if math.isinf(steps) else f"{steps:g}"
            best_rows.append(
                [opt, names[v], shown, "—" if math.isinf(steps) else fmt_num(lr), slow]
            )
    lines.append(
        md_table(["optimizer", "model variant", "best steps", "best lr", "slowdown"], best_rows)
    )
    report.tables.append(f"{stem}: best learning rate and slowdown")
    utility = _utility_table(rows, variants, names)
    if utility:
        lines.append(
            "\n**Benign utility** before the attack (after the defense) and after it, median over "
            "seeds (`diverged`: every seed diverged, so the model is destroyed):\n"
        )
        lines.append(md_table(*utility))
        report.tables.append(f"{stem}: benign utility")
    informed = _informed_rows(rows)
    if informed:
        lines.append("\n**Parameter cost of the informed attacks:**\n")
        lines.append(
            md_table(["adaptive", "params before", "params after", "added", "added %"], informed)
        )
        report.tables.append(f"{stem}: parameter cost")
    figure = report_plots.loss_curves(
        rows, out_dir / f"{stem}_curves.png", title=label, variant=variant, names=names
    )
    lines += report.embed(figure, f"loss curves, {label}")
    return "\n".join(lines)


_BENIGN = (
    "benign-text_perplexity",
    "benign_perplexity",
    "benign_accuracy",
    "benign_loss",
)


def _benign_value(block: Any, name: str) -> float | None:
    if isinstance(block, dict) and block.get(name) is not None:
        return float(block[name])
    return None


def _benign_name(rows: Sequence[Row]) -> str | None:
    keys = {k for r in rows if isinstance(r.get("before"), dict) for k in r["before"]}
    return next((k for k in _BENIGN if k in keys), None)


def _utility_table(
    rows: list[Row], variants: list[Variant], names: dict[Variant, str]
) -> tuple[list[str], list[list[Any]]] | None:
    """Benign metric before the attack (step-0 evaluation, i.e. after the defense) and after it
    (last evaluation; ``diverged`` when every seed diverged), median over seeds."""
    name = _benign_name(rows)
    if name is None:
        return None
    cells = _group(rows)
    table: list[list[Any]] = []
    before_row: list[Any] = ["before the attack", "—"]
    for v in variants:
        values = [
            x
            for (_, _, w), group in cells.items()
            if w == v
            for r in group
            if (x := _benign_value(r.get("before"), name)) is not None
        ]
        before_row.append(fmt_num(statistics.median(values)) if values else "—")
    table.append(before_row)
    for opt in sorted({k[0] for k in cells}):
        for lr in sorted({k[1] for k in cells if k[0] == opt}):
            line: list[Any] = [opt, fmt_num(lr)]
            for v in variants:
                group = cells.get((opt, lr, v), [])
                finished = [r for r in group if r.get("diverged_at") is None]
                after = [
                    x for r in finished if (x := _benign_value(r.get("after"), name)) is not None
                ]
                if not group:
                    line.append("—")
                elif not finished:
                    line.append("diverged")
                else:
                    text = fmt_num(statistics.median(after)) if after else "—"
                    if len(finished) < len(group):
                        text += f" ({len(group) - len(finished)}/{len(group)} diverged)"
                    line.append(text)
            table.append(line)
    return [f"{name}: optimizer", "lr", *(names[v] for v in variants)], table


def _informed_rows(rows: list[Row]) -> list[list[Any]]:
    seen: dict[str, list[Any]] = {}
    for r in rows:
        cost = r.get("cost") or {}
        before = cost.get("params_before", r.get("params_before"))
        after = cost.get("params_after", r.get("params_after"))
        if r.get("adaptive") and before is not None and after is not None:
            added = int(after) - int(before)
            seen[str(r["adaptive"])] = [
                str(r["adaptive"]),
                int(before),
                int(after),
                added,
                f"{100 * added / max(int(before), 1):.2f}",
            ]
    return list(seen.values())

"""The worst-case attacker's section of :mod:`specdef.report.page`: rows of searches
(``specdef attack --search``, a config's ``search:`` block) → slowdown vs threshold, trials needed,
stability edges, and three figures. A pure function of the rows; imports no training code.

A *cell* is one study: (model, task, model variant, optimizer, seed), the variant being α, the
defense mode and the informed transform. Per ladder rung a cell's best is the fewest steps any of
its trials needed to reach the rung; a cell where no trial reached it is right-censored at the step
budget (pruned trials stopped earlier, so "not reached" is about the trials as run). The slowdown
at a rung is the defended cell's best over the undefended cell's best with the same model, task,
optimizer and seed — each from its own search — with the censoring of
:func:`specdef.attack.metrics.slowdown`; the "any optimizer" rows let the attacker pick the
optimizer too (the best over optimizers, on both sides).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdef.attack.metrics import (
    LOSS_FRACTIONS,
    Slowdown,
    StepsToThreshold,
    Threshold,
    best_of_trials,
    slowdown,
)
from specdef.report import search_plots
from specdef.report.markdown import (
    Report,
    Row,
    alpha_key,
    alpha_label,
    fmt_num,
    md_table,
    row_alpha,
)

ANY = "any optimizer"  # the attacker picks the optimizer too
# optimizer → class, for the "by class" table and figure (the attacker picks the optimizer within
# the class); registry names (tests/report/test_search_classes.py holds it to the registry)
OPTIMIZER_CLASSES: dict[str, str] = {
    **dict.fromkeys(("sgd", "sgd-momentum", "nesterov"), "first-order"),
    **dict.fromkeys(("adam", "adamw", "adagrad", "rmsprop"), "adaptive"),
    "muon": "orthogonalized",
    **dict.fromkeys(("adahessian", "sophiah"), "Hutchinson diagonal"),
    **dict.fromkeys(("kfac", "ekfac", "ggn-cg", "newton-cg"), "natural gradient / Newton"),
    **dict.fromkeys(("shampoo", "soap", "kron"), "full-matrix"),
    **dict.fromkeys(("lion", "signsgd"), "sign-based"),
    "spsa": "zeroth-order",
    "sgld": "noisy",
}
CLASS_PREFIX = "class: "
HEADLINE_ACCURACY = (0.5, 0.75, 0.9, 0.95)  # accuracy rungs shown in the tables (when reached)

Variant = tuple[float | None, str | None, str | None]  # (α, defense mode, informed transform)
Cell = tuple[str, str, Variant, str, Any]  # (model, task, variant, optimizer, seed)


def is_search_row(row: Row) -> bool:
    """An attack row that is a search trial (it has a study and a trial number)."""
    return row.get("kind", "attack") == "attack" and "study" in row and "trial" in row


def search_variant(row: Row) -> Variant:
    alpha = row_alpha(row)
    mode = None
    if alpha is not None:
        mode = str(
            row.get("defense_mode") or (row.get("defense") or {}).get("mode") or "algorithm1"
        )
    adaptive = row.get("adaptive") or None
    return (alpha, mode, None if adaptive is None else str(adaptive))


def variant_name(v: Variant) -> str:
    text = alpha_label(v[0])
    if v[1] == "native":
        text += " native"
    if v[2]:
        text += f" + {v[2]}"
    return text


def _variant_sort(v: Variant) -> tuple[Any, ...]:
    return (v[0] is not None, v[2] is not None, str(v[1]), alpha_key(v[0]))


def cell_of(row: Row) -> Cell:
    return (str(row.get("model")), str(row.get("task")), search_variant(row),
            str(row.get("optimizer")), row.get("seed"))  # fmt: skip


def _ladder(row: Row) -> dict[str, Any] | None:
    ladder = (row.get("summary") or {}).get("ladder") or row.get("ladder")
    return ladder if isinstance(ladder, dict) else None


def _budget(row: Row) -> int:
    spec = row.get("spec") or {}
    return int(spec.get("steps") or (row.get("summary") or {}).get("budget") or 0)


def _lr(row: Row) -> float:
    value = (row.get("params") or {}).get("lr", row.get("lr"))
    return math.nan if value is None else float(value)


def _diverged(row: Row) -> bool:
    s = row.get("summary") or {}
    return (s.get("diverged_at") if "diverged_at" in s else row.get("diverged_at")) is not None


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder: its position, the label shown, whether higher values are better."""

    index: int
    label: str


def rungs_of(rows: Sequence[Row]) -> list[Rung]:
    """The rungs the tables show: accuracy rungs of :data:`HEADLINE_ACCURACY` that some trial
    reached (the lowest of them when none was), or every loss rung (fractions of the step-0
    loss)."""
    ladders = [lad for r in rows if (lad := _ladder(r))]
    if not ladders:
        return []
    stop = _stop_value(rows)
    out: list[Rung] = []
    lowest: Rung | None = None
    for i, rung in enumerate(ladders[0]["rungs"]):
        threshold = Threshold.parse(str(rung["threshold"]))
        if threshold.higher_is_better:
            if threshold.value not in HEADLINE_ACCURACY or (
                stop is not None and threshold.value > stop
            ):
                continue  # above a threshold the trials stopped at: censored by the stop itself
            here = Rung(i, f"{threshold.metric} ≥ {threshold.value:g}")
            lowest = lowest or here
            if any(lad["rungs"][i]["steps"] is not None for lad in ladders):
                out.append(here)
        else:
            fraction = LOSS_FRACTIONS[i] if i < len(LOSS_FRACTIONS) else math.nan
            out.append(Rung(i, f"{threshold.metric} ≤ {fraction:g} × start"))
    return out or ([lowest] if lowest else [])  # nothing reached: the lowest rung, all censored


def _stop_value(rows: Sequence[Row]) -> float | None:
    """The accuracy the trials stopped at (``stop_at_threshold``), if they did."""
    spec = rows[0].get("spec") or {}
    threshold = spec.get("threshold") or rows[0].get("threshold")
    if not spec.get("stop_at_threshold") or not isinstance(threshold, str):
        return None
    parsed = Threshold.parse(threshold)
    return parsed.value if parsed.higher_is_better else None


def objective_rung(rows: Sequence[Row], rungs: Sequence[Rung]) -> Rung | None:
    """The shown rung the search minimized the steps to (its threshold), else the highest."""
    spec = rows[0].get("spec") or {} if rows else {}
    threshold = spec.get("threshold") or (rows[0].get("threshold") if rows else None)
    if isinstance(threshold, str):
        parsed = Threshold.parse(threshold)
        for rung in rungs:
            if rung.label == f"{parsed.metric} ≥ {parsed.value:g}":
                return rung
    return rungs[-1] if rungs else None


@dataclass(frozen=True)
class Best:
    """A cell's best at one rung: fewest steps over its trials (``None``: none reached it), the
    trial and lr that did it, and how many trials (in trial order) the attacker ran until the
    first one reached it."""

    outcome: StepsToThreshold
    trial: int | None
    lr: float | None
    first: int | None  # 1-based count of trials up to the first success
    trials: int


def _rung_steps(row: Row, rung: int) -> int | None:
    """The first step at which ``row``'s own ladder met rung ``rung`` (``None``: it did not)."""
    ladder = _ladder(row)
    steps = ladder["rungs"][rung]["steps"] if ladder and rung < len(ladder["rungs"]) else None
    return None if steps is None else int(steps)


def _rung_outcome(row: Row, rung: int) -> StepsToThreshold:
    """One trial at ladder rung ``rung``, censored at its step budget (``diverged`` if it did)."""
    steps = _rung_steps(row, rung)
    if steps is not None:
        return StepsToThreshold(steps, _budget(row), "reached")
    return StepsToThreshold(None, _budget(row), "diverged" if _diverged(row) else "budget")


def best_at(trials: Sequence[Row], rung: int) -> Best:
    """The cell's best trial at ladder rung ``rung``, the earlier trial on a tie
    (:func:`~specdef.attack.metrics.best_of_trials`: the rule of ``specdef attack --baseline``
    too), and how many trials the attacker ran until the first success."""
    ordered = sorted(trials, key=lambda r: int(r["trial"]))
    outcomes = [_rung_outcome(r, rung) for r in ordered]
    index, outcome = best_of_trials(outcomes)
    first = next((n for n, o in enumerate(outcomes, start=1) if o.steps is not None), None)
    if index is None:  # no trial reached it (``outcome`` is None only for a cell without trials)
        censored = outcome or StepsToThreshold(None, 0, "budget")
        return Best(censored, None, None, None, len(ordered))
    row = ordered[index]
    return Best(outcomes[index], int(row["trial"]), _lr(row), first, len(ordered))


def _any_optimizer(bests: Iterable[Best]) -> Best:
    """The best over optimizers (the attacker picks one): fewest steps; censored if none reached."""
    items = list(bests)
    reached = [b for b in items if b.outcome.steps is not None]
    if reached:
        return min(reached, key=lambda b: b.outcome.bound)
    return max(items, key=lambda b: b.outcome.budget)


def seeds_text(values: Sequence[Slowdown]) -> str:
    """Slowdowns over seeds in one cell: median (min–max) when every seed is measured; a lower
    bound when some defended searches never reached the rung; the censoring in words."""
    n = len(values)
    measured = [v for v in values if v.relation in ("=", ">", "<")]
    if not measured:
        return "— (neither search reached it)"
    factors = [v.factor for v in measured if v.factor is not None]
    med, low, high = statistics.median(factors), min(factors), max(factors)
    spread = f" ({low:.3g}–{high:.3g})" if n > 1 and low != high else ""
    lower = sum(v.relation == ">" for v in measured)
    upper = sum(v.relation == "<" for v in measured)
    undefined = n - len(measured)
    notes = []
    if lower:
        notes.append(f"{lower}/{n} censored: defended never reached it")
    if upper:
        notes.append(f"{upper}/{n}: the undefended search never reached it")
    if undefined:
        notes.append(f"{undefined}/{n}: neither reached it")
    prefix = "≥ " if lower and not upper else ("≤ " if upper and not lower else "")
    if lower == len(measured):
        prefix = "> "
    text = f"{prefix}{med:.3g}×{spread}"
    return text + (f"; {', '.join(notes)}" if notes else "")


def _steps_text(best: Best) -> str:
    return str(best.outcome.steps) if best.outcome.steps is not None else f">{best.outcome.budget}"


@dataclass
class SearchTables:
    """Everything the section shows, computed once from the rows (also read by the figures)."""

    rungs: list[Rung]
    variants: list[Variant]
    optimizers: list[str]
    seeds: list[Any]
    best: dict[tuple[str, str, Variant, str, Any, int], Best]
    slow: dict[tuple[str, str, Variant, str, int], list[Slowdown]]
    classes: list[str]  # "class: NAME" keys of best / slow, in OPTIMIZER_CLASSES order


def _members(optimizers: Sequence[str]) -> dict[str, list[str]]:
    """``class: NAME`` → the optimizers of that class among ``optimizers``."""
    out: dict[str, list[str]] = {}
    for opt, cls in OPTIMIZER_CLASSES.items():
        if opt in optimizers:
            out.setdefault(CLASS_PREFIX + cls, []).append(opt)
    return out


def tables(rows: Sequence[Row]) -> SearchTables:
    cells: dict[Cell, list[Row]] = defaultdict(list)
    for row in rows:
        cells[cell_of(row)].append(row)
    rungs = rungs_of(rows)
    variants = sorted({c[2] for c in cells}, key=_variant_sort)
    optimizers = list(dict.fromkeys(c[3] for c in cells))
    seeds = sorted({c[4] for c in cells}, key=str)
    best: dict[tuple[str, str, Variant, str, Any, int], Best] = {}
    for (model, task, v, opt, seed), trials in cells.items():
        for rung in rungs:
            best[(model, task, v, opt, seed, rung.index)] = best_at(trials, rung.index)
    groups = {(c[0], c[1]) for c in cells}
    classes = _members(optimizers)
    for model, task in groups:
        for v in variants:
            for seed in seeds:
                for rung in rungs:
                    mine = [best[k] for k in best
                            if k[:3] == (model, task, v) and k[4] == seed and k[5] == rung.index]  # fmt: skip
                    if mine:
                        best[(model, task, v, ANY, seed, rung.index)] = _any_optimizer(mine)
                    for cls, members in classes.items():
                        inside = [best[(model, task, v, o, seed, rung.index)] for o in members
                                  if (model, task, v, o, seed, rung.index) in best]  # fmt: skip
                        if inside:
                            best[(model, task, v, cls, seed, rung.index)] = _any_optimizer(inside)
    slow: dict[tuple[str, str, Variant, str, int], list[Slowdown]] = defaultdict(list)
    undefended: Variant = (None, None, None)
    for (model, task, v, opt, seed, index), b in best.items():
        base = best.get((model, task, undefended, opt, seed, index))
        if v == undefended or base is None:
            continue
        slow[(model, task, v, opt, index)].append(slowdown(b.outcome, base.outcome))
    return SearchTables(rungs, variants, [*optimizers, ANY], seeds, best, dict(slow), list(classes))


def _slowdown_rows(
    t: SearchTables, model: str, task: str, labels: Mapping[str, str]
) -> list[list[str]]:
    """One row per defended variant and key of ``labels`` (an optimizer, or a ``class: NAME``)
    with a slowdown at some rung: the variant, the key's label, the slowdown per rung."""
    table = []
    for v in t.variants:
        if v == (None, None, None):
            continue
        for key, label in labels.items():
            cells = [t.slow.get((model, task, v, key, rung.index)) for rung in t.rungs]
            if any(cells):
                table.append([variant_name(v), label,
                              *(seeds_text(c) if c else "—" for c in cells)])  # fmt: skip
    return table


def search_section(
    rows: Sequence[Row], out_dir: Path, report: Report, *, edges: Sequence[Row] = (),
    failures: int = 0,
) -> str:  # fmt: skip
    """Markdown for search rows (and the ``stability-edge`` rows of the same run directory)."""
    t = tables(rows)
    groups = sorted({(str(r.get("model")), str(r.get("task"))) for r in rows})
    budget = max(_budget(r) for r in rows)
    threshold = str(rows[0].get("threshold") or (rows[0].get("spec") or {}).get("threshold"))
    per_cell: dict[Cell, int] = defaultdict(int)
    for r in rows:
        per_cell[cell_of(r)] += 1
    trials = sorted(set(per_cell.values()))
    lines = ["## Worst-case attacker (searched hyperparameters)\n"]
    lines.append(
        f"{len(per_cell)} studies (model variant × optimizer × seed), {len(rows)} trials "
        f"({'–'.join(map(str, (trials[0], trials[-1]))) if len(trials) > 1 else trials[0]} per "
        f"study{f', plus {failures} failed' if failures else ''}); each trial ≤ {budget} steps; "
        f"the search minimizes the censored steps to `{threshold}`; {len(t.seeds)} seed(s). "
        "A study's best at a rung is the fewest steps any of its trials needed; **slowdown** = "
        "the defended study's best / the undefended study's best (same optimizer and seed, each "
        "from its own search): median over seeds (min–max); `> x×` = no defended trial reached the "
        f"rung within {budget} steps (a lower bound; pruned trials stopped earlier); "
        "`any optimizer` = the attacker also picks the optimizer.\n"
    )
    for model, task in groups:
        lines.append(f"### {model} on {task}: slowdown vs threshold\n")
        table = _slowdown_rows(t, model, task, {opt: opt for opt in t.optimizers})
        lines.append(md_table(["model variant", "optimizer", *(r.label for r in t.rungs)], table))
        report.tables.append(f"search {model}: slowdown vs threshold")
        if len(t.classes) > 1:
            lines.append(
                "\n**By optimizer class** (the attacker picks the optimizer within the class, on "
                "both models: per seed the class's fewest steps, defended over undefended):\n"
            )
            members = _members(t.optimizers)
            labels = {cls: f"{cls.removeprefix(CLASS_PREFIX)} ({', '.join(members[cls])})"
                      for cls in t.classes}  # fmt: skip
            table = _slowdown_rows(t, model, task, labels)
            lines.append(md_table(["model variant", "class (optimizers)",
                                   *(r.label for r in t.rungs)], table))  # fmt: skip
            report.tables.append(f"search {model}: slowdown by optimizer class")
        lines.append(
            "\n**Best steps per seed** (fewest steps any trial needed; `>N` = no trial reached it) "
            "and, in brackets, **trials needed**: how many trials the attacker ran, in order, "
            "until the first one reached the rung (`—`: none did):\n"
        )
        table = []
        for v in t.variants:
            for opt in t.optimizers[:-1]:
                bests = [[t.best.get((model, task, v, opt, s, rung.index)) for s in t.seeds]
                         for rung in t.rungs]  # fmt: skip
                if not any(b for bs in bests for b in bs):
                    continue
                table.append([variant_name(v), opt, *(", ".join(
                    f"{_steps_text(b)} [{b.first or '—'}/{b.trials}]" for b in bs if b
                ) for bs in bests)])  # fmt: skip
        lines.append(md_table(["model variant", "optimizer", *(r.label for r in t.rungs)], table))
        report.tables.append(f"search {model}: best steps and trials needed")
        target = objective_rung(rows, t.rungs)
        edge_table = _edge_table([e for e in edges if str(e.get("model")) == model], t, model, task,
                                 target=target.index if target else None)  # fmt: skip
        if edge_table:
            lines.append(
                "\n**Stability edge** per study (the largest lr that does not diverge in the "
                "edge's horizon, bisected from 2/λ_max; median over seeds), and how far below "
                "the undefended search's best lr (its trial that reached the search's threshold "
                "in the fewest steps; median over seeds) it lies:\n"
            )
            lines.append(edge_table)
            report.tables.append(f"search {model}: stability edge")
    for index, (model, task) in enumerate(groups):
        lines += _figures([r for r in rows if (str(r.get("model")), str(r.get("task"))) == (model, task)],
                          t, model, task, edges, out_dir, f"search{index}", report,
                          threshold=threshold, budget=budget)  # fmt: skip
    return "\n".join(lines)


def points_of(rows: Sequence[Row], rung: int) -> list[search_plots.Point]:
    """Each trial as a point of the steps-vs-lr figure and the heatmap, at ladder rung ``rung``."""
    out = []
    for row in rows:
        s = row.get("summary") or {}
        steps = _rung_steps(row, rung)
        if steps is not None:
            kind, y = "reached", float(steps)
        elif _diverged(row):
            kind, y = "diverged", float(_budget(row))
        elif row.get("trial_state") == "pruned":
            kind, y = "pruned", float(s.get("steps_run") or s.get("budget") or _budget(row))
        else:
            kind, y = "budget", float(_budget(row))
        out.append(search_plots.Point(variant_name(search_variant(row)), str(row.get("optimizer")),
                                      _lr(row), y, kind))  # fmt: skip
    return out


def _figures(
    rows: Sequence[Row], t: SearchTables, model: str, task: str, edges: Sequence[Row],
    out_dir: Path, stem: str, report: Report, *, threshold: str, budget: int,
) -> list[str]:  # fmt: skip
    names = [variant_name(v) for v in t.variants]
    colors = search_plots.palette(names)
    step = min((int((r.get("spec") or {}).get("eval_every") or 10) for r in rows), default=10)
    defended = [v for v in t.variants if v != (None, None, None)]
    slow = {(variant_name(v), opt): [t.slow.get((model, task, v, opt, r.index), []) for r in t.rungs]
            for v in defended for opt in t.optimizers}  # fmt: skip
    lines = []
    figure = search_plots.slowdown_vs_threshold(
        slow, [r.label for r in t.rungs], [variant_name(v) for v in defended], t.optimizers,
        out_dir / f"{stem}_slowdown.png",
        title=f"{model} on {task}: slowdown vs threshold = defended best trial's steps / "
        f"undefended best trial's steps, each from its own search ({len(t.seeds)} seeds)",
        palette=colors,
    )  # fmt: skip
    lines += report.embed(figure, f"slowdown vs threshold, {model}")
    if len(t.classes) > 1:
        by_class = {(variant_name(v), cls): [t.slow.get((model, task, v, cls, r.index), [])
                                            for r in t.rungs]
                    for v in defended for cls in t.classes}  # fmt: skip
        figure = search_plots.slowdown_vs_threshold(
            by_class, [r.label for r in t.rungs], [variant_name(v) for v in defended],
            t.classes, out_dir / f"{stem}_slowdown_by_class.png",
            title=f"{model} on {task}: slowdown vs threshold by optimizer class (the attacker "
            f"picks the optimizer within the class on both models; {len(t.seeds)} seeds)",
            palette=colors,
        )  # fmt: skip
        lines += report.embed(figure, f"slowdown by optimizer class, {model}")
    if not t.rungs:
        return lines
    middle = t.rungs[len(t.rungs) // 2]  # the figures' rung (e.g. 0.75 of 0.5 / 0.75 / 0.9)
    points = points_of(rows, middle.index)
    median_edges = {(variant_name(v), opt): statistics.median(values)
                    for (v, opt), values in _edges_by_variant(edges).items()}  # fmt: skip
    figure = search_plots.steps_vs_lr(
        points, names, t.optimizers[:-1], out_dir / f"{stem}_steps_vs_lr.png", budget=budget,
        edges=median_edges, palette=colors,
        title=f"{model} on {task}: every search trial's steps to {middle.label} vs its learning "
        f"rate (the search minimized the steps to {threshold})",
    )  # fmt: skip
    lines += report.embed(figure, f"steps to threshold vs learning rate, {model}")
    figure = search_plots.lr_alpha_heatmap(
        points, names, t.optimizers[:-1], out_dir / f"{stem}_heatmap.png", budget=budget,
        floor=step,
        title=f"{model} on {task}: fewest steps to {middle.label} per learning-rate decade × "
        "model variant (all trials and seeds)",
    )  # fmt: skip
    lines += report.embed(figure, f"lr × model variant heatmap, {model}")
    return lines


def _edges_by_variant(edges: Sequence[Row]) -> dict[tuple[Variant, str], list[float]]:
    out: dict[tuple[Variant, str], list[float]] = defaultdict(list)
    for e in edges:
        value = (e.get("stability_edge") or {}).get("edge")
        if value is not None:
            out[(search_variant(e), str(e.get("optimizer")))].append(float(value))
    return dict(out)


def _edge_table(
    edges: Sequence[Row], t: SearchTables, model: str, task: str, *, target: int | None
) -> str:
    if not edges:
        return ""
    by: dict[tuple[Variant, str], list[dict[str, Any]]] = defaultdict(list)
    for e in edges:
        by[(search_variant(e), str(e.get("optimizer")))].append(e.get("stability_edge") or {})
    objective = target
    table = []
    for v in t.variants:
        for opt in t.optimizers[:-1]:
            found = by.get((v, opt))
            if not found:
                continue
            values = [float(x["edge"]) for x in found if x.get("edge") is not None]
            ceilings = [float(x["ceiling"]) for x in found if x.get("ceiling") is not None]
            edge = statistics.median(values) if values else None
            base_lrs = [b.lr for s in t.seeds
                        if objective is not None
                        and (b := t.best.get((model, task, (None, None, None), opt, s, objective)))
                        and b.lr is not None]  # fmt: skip
            base = statistics.median(base_lrs) if base_lrs else None
            below = f"{math.log10(base / edge):.1f}" if edge and base else "—"
            table.append([
                variant_name(v), opt,
                fmt_num(edge) if edge is not None else f"< {found[0].get('lr_min', 1e-12):g}",
                f"{len(values)}/{len(found)}",
                fmt_num(statistics.median(ceilings)) if ceilings else "—",
                fmt_num(edge / statistics.median(ceilings)) if edge and ceilings else "—",
                fmt_num(base), below,
            ])  # fmt: skip
    columns = ["model variant", "optimizer", "edge (median)", "seeds with an edge", "2/λ_max",
               "edge / (2/λ_max)", "undefended best lr", "decades below"]  # fmt: skip
    return md_table(columns, table)

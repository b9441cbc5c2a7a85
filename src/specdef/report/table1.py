"""The sections of ``docs/results/table1.md`` from ``relearn`` rows (:mod:`specdef.experiments.relearn`):
``table1`` — per defense, the starting harmful metric, steps and best metric at each learning rate of
the grid and at the searched attacker's best, utility before / after the defense, and the slowdown
against the undefended model per rung of the threshold ladder; ``defense-curvature`` — per defense,
the top Hessian eigenvalues on the harmful data and the GD ceiling 2/λ_max beside the measured
steps. Every cell lists the seeds in order (``s0 · s1 · …``). A pure function of the rows; imports
no training code."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from specdef.attack.metrics import StepsToThreshold, slowdown
from specdef.report.markdown import Row, fmt_num, md_table

UNDEFENDED = "none"


def _relearn(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.get("kind") == "relearn" and not r.get("error")]


def _by_model(rows: Sequence[Row]) -> list[list[Row]]:
    """The relearn rows per attacked model, in first-seen order (the config's): one config may
    hold several settings (``table1``: mlp-digits fine-tuned, and an MLP relearning after
    unlearning), each compared only with its own undefended model."""
    out: dict[str, list[Row]] = {}
    for row in _relearn(rows):
        out.setdefault(str(row.get("model")), []).append(row)
    return list(out.values())


def _per_model(section: Callable[[Sequence[Row]], str], rows: Sequence[Row]) -> str:
    """``section`` of each model's rows in turn, under a heading per model when there are several."""
    groups = _by_model(rows)
    if len(groups) <= 1:
        return section(rows)
    return "\n".join(f"**{g[0]['model']}**\n\n{section(g)}" for g in groups)


def _by_defense(rows: Sequence[Row]) -> dict[str, dict[int, Row]]:
    """defense name → seed → row, defenses in first-seen order (the config's)."""
    out: dict[str, dict[int, Row]] = {}
    for row in _relearn(rows):
        out.setdefault(str(row.get("defense_name") or UNDEFENDED), {})[int(row["seed"])] = row
    return out


def _seeds(per_seed: Mapping[int, Row], cell: Callable[[Row], str]) -> str:
    return " · ".join(cell(per_seed[s]) for s in sorted(per_seed))


def _outcome(entry: Mapping[str, Any] | None) -> StepsToThreshold | None:
    if not entry or "budget" not in entry:
        return None
    return StepsToThreshold.from_dict(entry)


def _steps(entry: Mapping[str, Any] | None) -> str:
    outcome = _outcome(entry)
    if outcome is None:
        return "—"
    if outcome.steps is not None:
        return str(outcome.steps)
    return "div." if outcome.reason == "diverged" else f">{outcome.budget}"


def _metric(row: Row) -> str:
    return str(row.get("threshold", "harmful_accuracy>=")).split(">=")[0].split("<=")[0]


def _utility_metric(row: Row) -> str:
    util = (row.get("utility") or {}).get("source") or {}
    return "benign_accuracy" if "benign_accuracy" in util else "benign_loss"


def _grid_cell(row: Row, lr: float) -> str:
    entry = _grid(row, lr)
    if entry is None:
        return "—"
    return f"{_steps(entry)} / {fmt_num(entry.get('best'))}"


def _search_cell(row: Row) -> str:
    best = (row.get("search") or {}).get("best")
    if not best:
        return "—"
    return f"{_steps(best)} / {fmt_num(best.get('best'))} (lr {best['lr']:.2g})"


def _rung(row: Row, threshold: str) -> StepsToThreshold | None:
    return _outcome(_rung_dict(row, threshold))


def _slowdown_cell(defended: Row, base: Row | None, threshold: str) -> str:
    """The defended searched steps to ``threshold``, then the slowdown against ``base``."""
    d = _rung(defended, threshold)
    b = _rung(base, threshold) if base is not None else None
    if d is None:
        return "—"
    steps = _steps(_rung_dict(defended, threshold))
    if b is None:
        return steps
    slow = slowdown(d, b)
    if slow.factor is None:
        return f"{steps} (undef.)"
    bound = {"=": "", ">": ">", "<": "<"}[slow.relation]
    return f"{steps} ({bound}{slow.factor:.3g}×)"


def table1_section(rows: Sequence[Row]) -> str:
    """The Table 1 shape per attacked model: one line per defense, the seeds in every cell; then
    the slowdown ladder."""
    return _per_model(_table1_one, rows)


def _table1_one(rows: Sequence[Row]) -> str:
    groups = _by_defense(rows)
    if not groups:
        return "Not run yet.\n"
    first = next(iter(next(iter(groups.values())).values()))
    metric = _metric(first)
    util = _utility_metric(first)
    lrs = sorted({float(g["lr"]) for r in _relearn(rows) for g in r.get("grid") or ()})
    seeds = sorted({int(r["seed"]) for r in _relearn(rows)})
    trials = (first.get("search") or {}).get("trials")
    budget = (first.get("attack") or {}).get("steps")
    lines = [
        f"{first['model']} attacked on {first['task']} with {first['attack']['optimizer']}, "
        f"{budget} steps, threshold {first['threshold']}; seeds {', '.join(map(str, seeds))} in "
        f"every cell (`{' · '.join(f's{s}' for s in seeds)}`); steps to the threshold (`>N`: not reached in N steps, `div.`: "
        f"diverged first) / best {metric} reached; the searched attacker's best of {trials} "
        "trials.",
        "",
    ]
    table = []
    for name, per_seed in groups.items():
        start = _seeds(per_seed, lambda r: fmt_num(r["utility"]["defended"].get(metric)))
        before = _seeds(per_seed, lambda r: fmt_num(r["utility"]["source"].get(util)))
        after = _seeds(per_seed, lambda r: fmt_num(r["utility"]["defended"].get(util)))
        cells = [name, start]
        cells += [_seeds(per_seed, functools.partial(_grid_cell, lr=lr)) for lr in lrs]
        cells += [_seeds(per_seed, _search_cell), f"{before} → {after}"]
        table.append(cells)
    columns = ["defense", f"start {metric}"]
    columns += [f"lr {lr:g}: steps / best" for lr in lrs]
    columns += ["searched best: steps / best (lr)", f"utility ({util}) before → after"]
    lines.append(md_table(columns, table))
    lines += [slowdown_ladder(groups), ""]
    return "\n".join(lines)


def slowdown_ladder(groups: Mapping[str, Mapping[int, Row]]) -> str:
    """Slowdown of each defense's searched best against the undefended model's (same seed), per
    rung of the ladder: `>x×` when the defended search never reached it (a lower bound)."""
    base = groups.get(UNDEFENDED, {})
    rung_names: list[str] = []
    for per_seed in groups.values():
        for row in per_seed.values():
            for entry in (row.get("search") or {}).get("rungs") or ():
                if entry["threshold"] not in rung_names:
                    rung_names.append(entry["threshold"])
    if not rung_names:
        return ""
    table = []
    for name, per_seed in groups.items():
        cells = [name]
        for rung in rung_names:

            def cell(r: Row, rung: str = rung, undefended: bool = name == UNDEFENDED) -> str:
                if undefended:
                    return _steps(_rung_dict(r, rung))
                return _slowdown_cell(r, base.get(int(r["seed"])), rung)

            cells.append(_seeds(per_seed, cell))
        table.append(cells)
    head = (
        "\nSlowdown against the threshold, per rung: the fewest steps any searched trial needed, "
        "and in brackets that ÷ the undefended model's (same seed; the `none` line gives those). "
        "`>x×`: the defended search never reached the rung in its budget, so x is a lower bound; "
        "`undef.`: not defined (neither reached it, or the undefended model starts above it).\n"
    )
    return head + "\n" + md_table(["defense", *rung_names], table)


def _rung_dict(row: Row, threshold: str) -> Mapping[str, Any] | None:
    for entry in (row.get("search") or {}).get("rungs") or ():
        if entry["threshold"] == threshold:
            return entry
    return None


def curvature_section(rows: Sequence[Row]) -> str:
    """Per attacked model and defense: top Hessian eigenvalues on the harmful data (Lanczos), the
    GD ceiling 2/λ_max, and beside them the measured steps: at each grid lr and the searched best
    with its lr."""
    return _per_model(_curvature_one, rows)


def _curvature_one(rows: Sequence[Row]) -> str:
    groups = _by_defense(rows)
    if not groups:
        return "Not run yet.\n"
    first = next(iter(next(iter(groups.values())).values()))
    curv = first.get("curvature") or {}
    budget = ((first.get("measure") or {}).get("curvature") or {}).get("max_hvps", "?")
    lrs = sorted({float(g["lr"]) for r in _relearn(rows) for g in r.get("grid") or ()})
    lines = [
        f"Hessian of the training loss of {first['task']} (a batch of "
        f"{(first.get('measure') or {}).get('curvature', {}).get('batch_size', '?')}, every "
        f"parameter, {curv.get('dtype', '?')}), top eigenvalues by Lanczos "
        f"(at most {budget} Hessian-vector products); 2/λ_max is the largest stable rate of plain "
        "gradient descent on the local quadratic. Seeds in every cell "
        f"(`{' · '.join(f's{s}' for s in sorted({int(r['seed']) for r in _relearn(rows)}))}`).",
        "",
    ]
    table = []
    for name, per_seed in groups.items():

        def eig(r: Row) -> str:
            values = (r.get("curvature") or {}).get("eigenvalues") or []
            return ", ".join(fmt_num(float(v)) for v in values) or "—"

        def ceiling(r: Row) -> str:
            return fmt_num((r.get("curvature") or {}).get("lr_ceiling"))

        def ratio(r: Row) -> str:
            best = (r.get("search") or {}).get("best")
            cap = (r.get("curvature") or {}).get("lr_ceiling")
            if not best or not cap:
                return "—"
            return fmt_num(float(best["lr"]) / float(cap))

        cells = [name, _seeds(per_seed, eig), _seeds(per_seed, ceiling)]
        cells += [_seeds(per_seed, functools.partial(_grid_steps, lr=lr)) for lr in lrs]
        cells += [_seeds(per_seed, _search_cell), _seeds(per_seed, ratio)]
        table.append(cells)
    columns = ["defense", "top Hessian eigenvalues", "2/λ_max"]
    columns += [f"steps at lr {lr:g}" for lr in lrs]
    columns += ["searched best: steps / best (lr)", "searched lr ÷ 2/λ_max"]
    lines.append(md_table(columns, table))
    return "\n".join(lines)


def _grid_steps(row: Row, lr: float) -> str:
    return _steps(_grid(row, lr))


def _grid(row: Row, lr: float) -> Mapping[str, Any] | None:
    return next((g for g in row.get("grid") or () if math.isclose(g["lr"], lr)), None)

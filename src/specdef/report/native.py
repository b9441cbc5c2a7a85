"""The section of ``docs/results/native_vs_algorithm1.md``: per variant (undefended, Algorithm 1,
native, each with its informed undo), the ``landscape`` row (size, function gap, σ₁(H), native
imbalance) joined with the ``attack`` rows of the same variant (the attacker's fewest steps over the
learning-rate grid, per optimizer). A pure function of the rows; imports no training code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specdef.attack.metrics import StepsToThreshold, best_over_grid
from specdef.report.markdown import Row


def variant_name(row: Row) -> str:
    """``undefended``, ``algorithm1`` or ``native``, then ``→transform`` when one was applied."""
    defense = row.get("defense") or {}
    alpha = defense.get("alpha")
    base = "undefended" if alpha is None else str(defense.get("mode", "algorithm1"))
    adaptive = row.get("adaptive") or (row.get("attack") or {}).get("adaptive")
    return f"{base}→{adaptive}" if adaptive else base


def _outcome(row: Row) -> StepsToThreshold:
    return StepsToThreshold.from_dict(row["summary"])


def native_section(rows: Sequence[Row]) -> str:
    """One table (and per-learning-rate lines) for the model and task of ``rows``."""
    landscape = [r for r in rows if r.get("kind") == "landscape"]
    attacks = [r for r in rows if r.get("kind") == "attack"]
    if not landscape:
        return "Not run yet.\n"
    first = landscape[0]
    top_k = (next((r for r in landscape if r.get("alpha") is not None), first)["defense"]).get(
        "top_k"
    )
    lines = [f"## {first['model']} on {first['task']} (k = {top_k})", ""]
    opts = list(dict.fromkeys(str(r["optimizer"]) for r in attacks))
    lrs = sorted({float(r["lr"]) for r in attacks})
    spec = attacks[0]["attack"] if attacks else {}
    measure = first.get("measure") or {}
    lines.append(
        f"Threshold `{spec.get('threshold')}`, budget {spec.get('steps')} steps, "
        f"learning rates {{{', '.join(f'{lr:g}' for lr in lrs)}}}, batch {spec.get('batch_size')}; "
        f"Lanczos ≤ {measure.get('lanczos_iter')} Hessian-vector products on a batch of "
        f"{measure.get('batch_size')}."
    )
    lines.append("")
    grid: dict[tuple[str, str], dict[float, Row]] = {}
    for r in attacks:
        grid.setdefault((variant_name(r), str(r["optimizer"])), {})[float(r["lr"])] = r
    undefended = next(r["sigma1"] for r in landscape if variant_name(r) == "undefended")
    head = ["variant", "parameters", "gap", "σ₁(H)", "σ₁ / undefended", "converged", "imbalance"]
    head += [f"{o}: steps (best lr)" for o in opts]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in landscape:
        name = variant_name(r)
        cells = [
            name,
            f"{r['parameters']['attacked']:,}",
            f"{r['function_gap']:.1e}",
            f"{r['sigma1']:.3e}",
            f"{r['sigma1'] / undefended:.3g}",
            "yes" if r["converged"] else "no",
            f"{r['imbalance_log10']:.2f}" if "imbalance_log10" in r else "—",
        ]
        for o in opts:
            per = grid.get((name, o), {})
            best_lr, best = best_over_grid({lr: _outcome(x) for lr, x in per.items()})
            text = "—" if best is None else str(best)
            cells.append(f"{text} ({best_lr:g})" if best_lr else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    by_loss = str(spec.get("threshold", "")).startswith("harmful_loss")
    note = (
        ", held-out harmful loss at the last evaluation: at the threshold, or before divergence"
        if by_loss
        else ""
    )
    for o in opts:
        parts = []
        for r in landscape:
            name = variant_name(r)
            per = grid.get((name, o), {})
            cells = []
            for lr in sorted(per):
                text = f"{lr}→{_outcome(per[lr])}"
                if by_loss:
                    final: dict[str, Any] = per[lr]["summary"].get("final", {})
                    text += f" ({final.get('harmful_loss', float('nan')):.3f})"
                cells.append(text)
            parts.append(f"{name}: " + ", ".join(cells))
        lines.append(f"Per learning rate ({o}{note}): " + "; ".join(parts) + ".")
        lines.append("")
    return "\n".join(lines)

"""Figures of the worst-case attacker's section (:mod:`specdef.report.search`): slowdown vs
threshold, steps-to-threshold vs learning rate (every trial, censored, pruned and diverged trials
each with their own marker), and an lr × model-variant heatmap. Plain data in, PNG out (matplotlib,
Agg backend); no training code."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter, NullFormatter

from specdef.attack.metrics import Slowdown
from specdef.report.plots import COLORS, plt, save_figure

KINDS = {  # trial outcome → (marker, filled, legend text)
    "reached": ("o", True, "reached the threshold (steps)"),
    "budget": ("^", False, "not reached in the budget (drawn at the budget)"),
    "pruned": ("v", False, "pruned (drawn at the step it was stopped)"),
    "diverged": ("x", True, "diverged (drawn in the band above the budget)"),
}


def palette(variants: Sequence[str]) -> dict[str, str]:
    """One distinct colour per variant, the same in every figure."""
    return {v: COLORS[i % len(COLORS)] for i, v in enumerate(variants)}


@dataclass(frozen=True)
class Point:
    """One trial: which variant and optimizer, its lr, its steps to the search's threshold (the
    budget or the step it stopped when not reached) and how it ended (a key of :data:`KINDS`)."""

    variant: str
    optimizer: str
    lr: float
    steps: float
    kind: str


def _panels(n: int, width: float = 4.0, height: float = 3.2) -> tuple[Any, np.ndarray]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.8), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def slowdown_vs_threshold(
    slow: Mapping[tuple[str, str], Sequence[Sequence[Slowdown]]],
    rungs: Sequence[str],
    variants: Sequence[str],
    optimizers: Sequence[str],
    path: Path,
    *,
    title: str,
    palette: Mapping[str, str],
) -> Path | None:
    """One panel per optimizer: slowdown at each rung per variant, median over seeds with a
    min–max bar; a lower bound (some seed's defended search never reached the rung) as ▲, a
    rung where the undefended search failed as ▼ (an upper bound)."""
    keys = [(v, o) for o in optimizers for v in variants if slow.get((v, o))]
    if not keys or not rungs:
        return None
    shown = [o for o in optimizers if any(k[1] == o for k in keys)]
    fig, axes = _panels(len(shown))
    x = np.arange(len(rungs))
    for ax, opt in zip(axes.flat, shown, strict=False):
        for k, v in enumerate(variants):
            per_rung = slow.get((v, opt))
            if not per_rung:
                continue
            color = palette[v]
            offset = (k - len(variants) / 2) * 0.06
            for i, values in enumerate(per_rung):
                factors = [float(s.factor) for s in values if s.factor is not None]
                if not factors:
                    continue
                med = float(np.median(factors))
                marker, face = "o", color
                if any(s.relation == ">" for s in values):
                    marker, face = "^", "none"
                elif any(s.relation == "<" for s in values):
                    marker, face = "v", "none"
                ax.errorbar(x[i] + offset, med, yerr=[[med - min(factors)], [max(factors) - med]],
                            color=color, fmt="none", lw=1, capsize=2)  # fmt: skip
                ax.plot(x[i] + offset, med, marker=marker, mfc=face, mec=color, ls="none", ms=7)
            meds = [float(np.median([s.factor for s in vals if s.factor is not None]))
                    if any(s.factor is not None for s in vals) else np.nan for vals in per_rung]  # fmt: skip
            ax.plot(x + offset, meds, color=color, lw=1, alpha=0.6)
        ax.axhline(1.0, color="k", ls="--", lw=0.7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}×"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(x, rungs, fontsize=7, rotation=15)
        ax.set_title(opt, fontsize=9)
        ax.set_ylabel("slowdown (defended / undefended steps)", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=palette[v], marker="o", ls="-", label=v)
               for v in variants if any(slow.get((v, o)) for o in shown)]  # fmt: skip
    handles += [
        plt.Line2D([], [], color="k", marker="o", ls="none", label="median over seeds (bar: min–max)"),
        plt.Line2D([], [], color="k", marker="^", mfc="none", ls="none",
                   label="lower bound: a defended search never reached the rung"),
        plt.Line2D([], [], color="k", marker="v", mfc="none", ls="none",
                   label="upper bound: the undefended search never reached it"),
        plt.Line2D([], [], color="k", ls="--", label="no slowdown (1×)"),
    ]  # fmt: skip
    return _finish(fig, handles, title, path)


def steps_vs_lr(
    points: Sequence[Point],
    variants: Sequence[str],
    optimizers: Sequence[str],
    path: Path,
    *,
    budget: int,
    edges: Mapping[tuple[str, str], float],
    title: str,
    palette: Mapping[str, str],
) -> Path | None:
    """One log–log panel per optimizer: each trial's steps to the threshold against its lr,
    coloured by variant; the outcome is the marker (:data:`KINDS`); a variant's stability edge
    (median over seeds) is a dotted vertical line of its colour."""
    shown = [o for o in optimizers if any(p.optimizer == o for p in points)]
    if not shown:
        return None
    fig, axes = _panels(len(shown))
    band = budget * 1.6
    for ax, opt in zip(axes.flat, shown, strict=False):
        for v in variants:
            color = palette[v]
            for kind, (marker, filled, _) in KINDS.items():
                mine = [
                    p for p in points if p.optimizer == opt and p.variant == v and p.kind == kind
                ]
                if not mine:
                    continue
                y = [band if kind == "diverged" else max(p.steps, 1.0) for p in mine]
                style = ({"c": color} if kind == "diverged" else
                         {"facecolors": color if filled else "none", "edgecolors": color})  # fmt: skip
                ax.scatter([p.lr for p in mine], y, marker=marker, s=24, lw=1, alpha=0.8, **style)
            edge = edges.get((v, opt))
            if edge is not None:
                ax.axvline(edge, color=color, ls=":", lw=1)
        ax.axhline(budget, color="k", ls="--", lw=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(top=band * 1.4)
        ax.set_title(opt, fontsize=9)
        ax.set_xlabel("learning rate (trial)", fontsize=8)
        ax.set_ylabel("steps to the threshold", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=palette[v], marker="s", ls="none", label=v)
               for v in variants]  # fmt: skip
    for marker, filled, text in KINDS.values():
        handles.append(plt.Line2D([], [], color="k", marker=marker, mfc="k" if filled else "none",
                                  ls="none", label=text))  # fmt: skip
    handles += [plt.Line2D([], [], color="k", ls="--", label=f"step budget ({budget})"),
                plt.Line2D([], [], color="k", ls=":", label="stability edge (median over seeds)")]  # fmt: skip
    return _finish(fig, handles, title, path)


def lr_alpha_heatmap(
    points: Sequence[Point],
    variants: Sequence[str],
    optimizers: Sequence[str],
    path: Path,
    *,
    budget: int,
    title: str,
    floor: float = 10.0,
) -> Path | None:
    """One panel per optimizer: learning-rate decades × variant, each cell the fewest steps to
    the threshold of the trials whose lr falls in that decade (all seeds), on a log colour scale;
    ``>N`` = none reached it (some ran the whole budget); ``pruned`` = none reached it before the
    pruner stopped them; ``div`` = every trial there diverged; grey = no trial there. ``floor``:
    the lowest steps on the colour scale (the evaluation interval)."""
    shown = [o for o in optimizers if any(p.optimizer == o for p in points)]
    if not shown or not points:
        return None
    low = math.floor(math.log10(min(p.lr for p in points)))
    high = math.ceil(math.log10(max(p.lr for p in points)))
    high = max(high, low + 1)
    decades = list(range(low, high))
    fig, axes = _panels(
        len(shown), width=0.45 * len(decades) + 2.4, height=0.45 * len(variants) + 1.4
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    image = None
    for ax, opt in zip(axes.flat, shown, strict=False):
        grid = np.full((len(variants), len(decades)), np.nan)
        notes: dict[tuple[int, int], str] = {}
        cells: dict[tuple[int, int], list[Point]] = defaultdict(list)
        for p in points:
            if p.optimizer != opt or p.variant not in variants:
                continue
            j = min(max(math.floor(math.log10(p.lr)) - low, 0), len(decades) - 1)
            cells[(variants.index(p.variant), j)].append(p)
        for (i, j), mine in cells.items():
            reached = [p.steps for p in mine if p.kind == "reached"]
            if reached:
                grid[i, j] = min(reached)
                notes[(i, j)] = f"{min(reached):.0f}"
            elif any(p.kind == "budget" for p in mine):
                notes[(i, j)] = f">{budget}"
            elif any(p.kind == "pruned" for p in mine):
                notes[(i, j)] = "pruned"
            else:
                notes[(i, j)] = "div"
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap,
                          norm=LogNorm(vmin=floor, vmax=max(budget, 10 * floor)), origin="upper")  # fmt: skip
        for (i, j), text in notes.items():
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="w" if text[0].isdigit() else "k")  # fmt: skip
        ax.set_xticks(range(len(decades)), [f"1e{d}" for d in decades], fontsize=6, rotation=60)
        ax.set_yticks(range(len(variants)), variants if ax in axes[:, 0] else [], fontsize=7)
        ax.set_title(opt, fontsize=9)
        ax.set_xlabel("learning-rate decade [10^d, 10^(d+1))", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="fewest steps to the threshold")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _finish(fig: Any, handles: list[Any], title: str, path: Path) -> Path:
    """Title on top, one legend naming every colour and marker below the panels."""
    fig.suptitle(title, fontsize=9)
    ncol = 2
    rows = math.ceil(len(handles) / ncol)
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 0.95))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    return save_figure(fig, path)

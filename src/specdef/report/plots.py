"""PNG figures for :mod:`specdef.report.page` (matplotlib, Agg backend; no training code imported)."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

Row = dict[str, Any]
# ten distinct colours (grey first: the undefended model in most figures, then tab10)
COLORS = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#17becf", "#bcbd22"]  # fmt: skip
LOG_RANGE = 20.0  # a loss axis is logarithmic only when its values span more than this factor


def _alpha(row: Row) -> float | None:
    value = row["alpha"] if "alpha" in row else (row.get("defense") or {}).get("alpha")
    return None if value is None else float(value)


def _alpha_key(alpha: float | None) -> float:
    return -1.0 if alpha is None else alpha


def _label(alpha: float | None) -> str:
    return "undefended" if alpha is None else f"α={alpha:.0e}"


def history_series(row: Row, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, values)`` of one metric from a row's ``evals`` (held-out evaluations) or
    ``history`` (per-step training records); each a list of dicts with ``step``, or a dict of
    equal-length lists. Non-finite values become NaN."""
    for source in ("evals", "history"):
        hist = row.get(source)
        if isinstance(hist, list):
            hist = {k: [h.get(k) for h in hist] for k in {k for h in hist for k in h}}
        if isinstance(hist, dict) and metric in hist:
            break
    else:
        return None
    values = np.array([np.nan if v is None else float(v) for v in hist[metric]], dtype=float)
    steps = np.array(hist.get("step", range(len(values))), dtype=float)
    values[~np.isfinite(values)] = np.nan
    return steps, values


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(
    rows: Sequence[Row],
    path: Path,
    *,
    title: str = "",
    variant: Callable[[Row], Any] = _alpha,
    names: Mapping[Any, str] | None = None,
) -> Path | None:
    """A grid of panels (rows: optimizer, columns: learning rate), one curve per model variant
    (median over seeds, min–max band), of the held-out attacked metric — or the training loss if
    the rows have no held-out history. Dotted vertical lines mark divergence."""
    metric = str(rows[0].get("metric", "harmful_loss"))
    if not any(history_series(r, metric) for r in rows):
        metric = "train_loss"
    if not any(history_series(r, metric) for r in rows):
        return None
    optimizers = sorted({str(r.get("optimizer")) for r in rows})
    lrs = sorted({float(r.get("lr") or 0.0) for r in rows})
    variants = list(names) if names else sorted({variant(r) for r in rows}, key=str)
    groups: dict[tuple[str, float, Any], list[Row]] = defaultdict(list)
    for r in rows:
        groups[(str(r.get("optimizer")), float(r.get("lr") or 0.0), variant(r))].append(r)
    fig, axes = plt.subplots(
        len(optimizers),
        len(lrs),
        figsize=(2.8 * len(lrs) + 0.5, 2.3 * len(optimizers) + 0.6),
        squeeze=False,
        sharex=True,
    )
    threshold = rows[0].get("threshold")
    for i, opt in enumerate(optimizers):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for k, v in enumerate(variants):
                mine = groups.get((opt, lr, v), [])
                series = [s for r in mine if (s := history_series(r, metric))]
                if not series:
                    continue
                n = min(len(s[0]) for s in series)
                steps = series[0][0][:n]
                stack = np.stack([s[1][:n] for s in series])
                color = COLORS[k % len(COLORS)]
                label = names[v] if names else str(v)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ax.plot(steps, np.nanmedian(stack, axis=0), color=color, lw=1.4, label=label)
                    if len(series) > 1:
                        low, high = np.nanmin(stack, 0), np.nanmax(stack, 0)
                        ax.fill_between(steps, low, high, color=color, alpha=0.15)
                for r, (_, values) in zip(mine, series, strict=False):
                    if r.get("diverged_at") is not None:
                        ax.axvline(float(r["diverged_at"]), color=color, ls=":", lw=0.8)
                        finite = values[np.isfinite(values)]
                        if len(finite):
                            ax.plot(float(r["diverged_at"]), finite[-1], "x", color=color, ms=7)
            if threshold is not None and metric != "train_loss":
                ax.axhline(float(threshold), color="k", ls="--", lw=0.7)
            if metric.endswith("loss") and ax.has_data() and _wide(ax):
                ax.set_yscale("log")
            ax.set_title(f"{opt}, lr={lr:g}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(optimizers) - 1:
                ax.set_xlabel("step", fontsize=8)
            if j == 0:
                ax.set_ylabel(metric, fontsize=8)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    # name every marker, not only the colours
    handles.append(plt.Line2D([], [], color="k", ls=":", marker="x", label="diverged at that step"))
    labels.append("diverged at that step (dotted line, × at the last finite value)")
    if threshold is not None and metric != "train_loss":
        handles.append(plt.Line2D([], [], color="k", ls="--", lw=0.7))
        labels.append(f"threshold {float(threshold):g}")
    if len({r.get("seed") for r in rows}) > 1:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="k", alpha=0.15))
        labels.append("min–max over seeds")
    what = f"held-out {metric} vs step" if metric != "train_loss" else "training loss vs step"
    fig.suptitle(f"{title + ': ' if title else ''}{what}, one panel per optimizer × learning rate, "
                 "median over seeds", fontsize=9)  # fmt: skip
    legend_rows = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, 0.05 * legend_rows / len(optimizers), 1, 1))
    fig.legend(
        handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False
    )
    return save_figure(fig, path)


def _wide(ax: Any) -> bool:
    """Whether the data on ``ax`` span more than :data:`LOG_RANGE` (a log axis helps), else a
    linear axis shows a narrow range better."""
    values = np.concatenate(
        [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.array([])]
    )
    values = values[np.isfinite(values) & (values > 0)]
    return bool(len(values)) and float(values.max() / values.min()) > LOG_RANGE


def sigma_vs_alpha(rows: Sequence[Row], path: Path) -> Path | None:
    """σ₁(H) (exact and estimated) and each certified bound vs. α, log–log, one panel per model.
    The undefended model is drawn at α = 1."""
    models = sorted({str(r.get("model")) for r in rows})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = sorted(
            (r for r in rows if str(r.get("model")) == model), key=lambda r: _alpha(r) or 1.0
        )
        x = np.array([_alpha(r) or 1.0 for r in mine])
        series: dict[str, list[float]] = {"σ₁ exact": [], "σ₁ estimate": []}
        names = sorted({b for r in mine for b in (r.get("bounds") or {})})
        for b in names:
            series[f"bound: {b}"] = []
        for r in mine:
            series["σ₁ exact"].append(_num(r.get("sigma1_exact")))
            series["σ₁ estimate"].append(_num(r.get("sigma1")))
            for b in names:
                series[f"bound: {b}"].append(_num((r.get("bounds") or {}).get(b)))
        styles = {"σ₁ exact": ("k", "o", "-"), "σ₁ estimate": ("#1f77b4", "x", "--")}
        for k, (name, ys) in enumerate(series.items()):
            y = np.array(ys)
            ok = np.isfinite(y) & (y > 0)
            if not ok.any():
                continue
            color, marker, ls = styles.get(name, (COLORS[(k + 1) % len(COLORS)], "s", ":"))
            ax.plot(x[ok], y[ok], color=color, marker=marker, ls=ls, lw=1.2, ms=4, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("α (1 = undefended)")
        ax.set_ylabel("σ₁(H)")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path)


def gap_vs_alpha(rows: Sequence[Row], path: Path) -> Path | None:
    """Function gap vs. α per dtype (log–log); refused configurations marked with ×."""
    dtypes = sorted({str(r.get("dtype")) for r in rows})
    models = sorted({str(r.get("model")) for r in rows})
    if not dtypes:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for k, dtype in enumerate(dtypes):
            mine = sorted(
                (r for r in rows if str(r.get("dtype")) == dtype and str(r.get("model")) == model),
                key=lambda r: _alpha(r) or 1.0,
            )
            x = np.array([_alpha(r) or 1.0 for r in mine])
            y = np.array([max(_num(r.get("function_gap")), 1e-18) for r in mine])
            if not len(x):
                continue
            color = COLORS[(k + 1) % len(COLORS)]
            ax.plot(x, y, color=color, marker="o", lw=1.2, ms=4, label=dtype)
            refused = np.array([not r.get("guard_accepted", True) for r in mine])
            if refused.any():
                ax.scatter(x[refused], y[refused], marker="x", s=60, color="k", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("α  (× = precision guard refuses)")
        ax.set_ylabel("relative function gap")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path)


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out

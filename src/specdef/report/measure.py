"""Curvature and utility sections of :mod:`specdef.report.page`: one table row per model × α (× dtype)
and one figure each. Imports no training code."""

from __future__ import annotations

from pathlib import Path

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


def curvature_section(rows: list[Row], out_dir: Path, report: Report) -> str:
    lines = ["### Curvature: σ₁(H) and certified lower bounds vs. α\n"]
    bound_names = sorted({k for r in rows for k in (r.get("bounds") or {})})
    table = []
    for r in sorted(rows, key=lambda r: (str(r.get("model")), alpha_key(row_alpha(r)))):
        bounds = r.get("bounds") or {}
        table.append(
            [
                str(r.get("model")),
                alpha_label(row_alpha(r)),
                fmt_num(r.get("sigma1_exact")),
                fmt_num(r.get("sigma1")),
                *(fmt_num(bounds.get(b)) for b in bound_names),
                fmt_num(r.get("lr_ceiling")),
                "yes" if r.get("bounds_hold", True) else "**NO**",
            ]
        )
    lines.append(
        "`σ₁ exact` is the dense float64 Hessian's largest |eigenvalue| (— where the model is too "
        "large); `σ₁ estimate` the iterative estimate; bounds must never exceed σ₁; "
        "`lr ceiling` = 2/σ₁ for gradient descent.\n"
    )
    columns = [
        "model",
        "defense",
        "σ₁ exact",
        "σ₁ estimate",
        *bound_names,
        "lr ceiling",
        "bounds ≤ σ₁",
    ]
    lines.append(md_table(columns, table))
    report.tables.append("curvature: sigma1 and bounds")
    figure = report_plots.sigma_vs_alpha(rows, out_dir / "curvature_sigma1.png")
    lines += report.embed(figure, "σ₁(H) and bounds vs α")
    return "\n".join(lines)


def utility_section(rows: list[Row], out_dir: Path, report: Report) -> str:
    lines = ["### Utility: function gap and metric deltas vs. α × dtype\n"]
    metric_names = sorted({k for r in rows for k in (r.get("metrics_before") or {})})
    table = []
    for r in sorted(
        rows, key=lambda r: (str(r.get("model")), str(r.get("dtype")), alpha_key(row_alpha(r)))
    ):
        before, after = r.get("metrics_before") or {}, r.get("metrics_after") or {}
        deltas = [
            fmt_num(after[m] - before[m])
            if m in after and m in before and after[m] is not None
            else "—"
            for m in metric_names
        ]
        table.append(
            [
                str(r.get("model")),
                str(r.get("dtype")),
                alpha_label(row_alpha(r)),
                fmt_num(r.get("reconstruction_error")),
                fmt_num(r.get("function_gap")),
                *deltas,
                "accepts" if r.get("guard_accepted") else "refuses",
            ]
        )
    lines.append(
        "`reconstruction` = max over defended layers of ‖C·W̃ − W‖/‖W‖ in the dtype; `function gap` "
        "= max |logit difference| / max |logit| on held-out inputs; Δ = after − before the defense.\n"
    )
    columns = ["model", "dtype", "defense", "reconstruction", "function gap"]
    columns += [f"Δ {m}" for m in metric_names] + ["precision guard"]
    lines.append(md_table(columns, table))
    report.tables.append("utility: function gap and deltas")
    figure = report_plots.gap_vs_alpha(rows, out_dir / "utility_gap.png")
    lines += report.embed(figure, "function gap vs α per dtype")
    return "\n".join(lines)

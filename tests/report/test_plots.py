"""specdef.report.plots: each figure is a readable PNG whose panels, titles, legend entries and
plotted points follow a small synthetic rows list (medians recomputed here with numpy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from specdef.report import plots

OPTIMIZERS, LRS, ALPHAS, SEEDS = ("adamw", "sgd"), (1e-4, 1e-3, 1e-2), (None, 1e4), (0, 1)
NAMES = {None: "undefended", 1e4: "α=1e+04"}


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the plot functions close, kept for inspection after its PNG is written."""
    seen: list[Figure] = []
    close = plots.plt.close

    def keep(fig: Any = None) -> None:
        seen.append(fig)
        close(fig)

    monkeypatch.setattr(plots.plt, "close", keep)
    return seen


def _curve(opt: str, lr: float, alpha: float | None, seed: int) -> list[float]:
    rate = lr * (10 if opt == "adamw" else 1) / (1 if alpha is None else 100)
    return [float(3.0 * np.exp(-rate * 50 * step) + 0.1 * seed + 0.05) for step in range(6)]


def _attack_rows() -> list[dict[str, Any]]:
    rows = []
    for opt in OPTIMIZERS:
        for lr in LRS:
            for alpha in ALPHAS:
                for seed in SEEDS:
                    losses = _curve(opt, lr, alpha, seed)
                    rows.append({
                        "kind": "attack", "optimizer": opt, "lr": lr, "alpha": alpha, "seed": seed,
                        "metric": "harmful_loss", "threshold": 1.5,
                        "evals": [{"step": s, "harmful_loss": v} for s, v in enumerate(losses)],
                        "diverged_at": 3 if (opt, lr, alpha, seed) == ("sgd", 1e-2, 1e4, 1) else None,
                    })  # fmt: skip
    return rows


def _png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas
    return image


def _legend(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_loss_curves(tmp_path: Path, figures: list[Figure]) -> None:
    rows = _attack_rows()
    path = plots.loss_curves(rows, tmp_path / "curves.png", title="E0: attack", names=NAMES)
    assert path == tmp_path / "curves.png"
    image = _png(path)
    assert image.shape[1] > image.shape[0]  # 2 optimizers × 3 learning rates: wider than tall
    (fig,) = figures
    # the title says what is plotted; the legend names every colour and every marker
    assert fig._suptitle is not None
    assert fig._suptitle.get_text().startswith("E0: attack: held-out harmful_loss vs step")
    assert _legend(fig) == ["undefended", "α=1e+04",
                            "diverged at that step (dotted line, × at the last finite value)",
                            "threshold 1.5", "min–max over seeds"]  # fmt: skip
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {f"{o}, lr={lr:g}" for o in OPTIMIZERS for lr in LRS}
    ax = panels["adamw, lr=0.001"]
    assert panels["adamw, lr=0.0001"].get_ylabel() == "harmful_loss"  # first column only
    values = np.concatenate([np.asarray(ln.get_ydata(), dtype=float) for ln in ax.get_lines()])
    values = values[np.isfinite(values) & (values > 0)]
    wide = values.max() / values.min() > plots.LOG_RANGE
    assert ax.get_yscale() == ("log" if wide else "linear")
    for alpha, label in NAMES.items():
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
        median = np.median([_curve("adamw", 1e-3, alpha, s) for s in SEEDS], axis=0)
        np.testing.assert_allclose(line.get_ydata(), median, rtol=1e-12)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(6))
    threshold = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [1.5, 1.5]]
    assert len(threshold) == 1  # the dashed threshold line
    diverged = panels["sgd, lr=0.01"]
    assert any(list(ln.get_xdata()) == [3.0, 3.0] for ln in diverged.get_lines())
    assert not any(list(ln.get_xdata()) == [3.0, 3.0] for ln in ax.get_lines())


def test_a_narrow_loss_range_gets_a_linear_axis(tmp_path: Path, figures: list[Figure]) -> None:
    def row(values: list[float]) -> dict[str, Any]:
        return {"optimizer": "sgd", "lr": 0.1, "alpha": None, "metric": "harmful_loss",
                "evals": [{"step": s, "harmful_loss": v} for s, v in enumerate(values)]}  # fmt: skip

    plots.loss_curves([row([2.0, 1.9, 1.7])], tmp_path / "narrow.png")
    plots.loss_curves([row([2.0, 0.5, 0.01])], tmp_path / "wide.png")
    assert [f.axes[0].get_yscale() for f in figures] == ["linear", "log"]


def test_loss_curves_fall_back_to_training_loss_or_draw_nothing(
    tmp_path: Path, figures: list[Figure]
) -> None:
    rows = [
        {"optimizer": "sgd", "lr": 0.1, "alpha": None, "history": {"step": [0, 1], "train_loss": [2.0, 1.0]}}
    ]  # fmt: skip
    _png(plots.loss_curves(rows, tmp_path / "train.png") or Path("missing"))
    assert figures[0].axes[0].get_ylabel() == "train_loss"
    assert plots.loss_curves([{"optimizer": "sgd", "lr": 0.1}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def _curvature_rows() -> list[dict[str, Any]]:
    rows = []
    for model, scale in (("mlp", 1.0), ("vit", 3.0)):
        for alpha in (None, 1e2, 1e4):
            a = 1.0 if alpha is None else alpha
            rows.append({
                "kind": "curvature", "model": model, "alpha": alpha,
                "sigma1_exact": None if (model, alpha) == ("vit", 1e4) else scale * a,
                "sigma1": 0.9 * scale * a,
                "bounds": {"rayleigh": 0.5 * scale * a, "block": 0.7 * scale * a},
            })  # fmt: skip
    return rows


def test_sigma_vs_alpha(tmp_path: Path, figures: list[Figure]) -> None:
    _png(plots.sigma_vs_alpha(_curvature_rows(), tmp_path / "sigma.png") or Path("missing"))
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["mlp", "vit"]
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels == ["σ₁ exact", "σ₁ estimate", "bound: block", "bound: rayleigh"]
        assert ax.get_xscale() == ax.get_yscale() == "log"
    lines = {ln.get_label(): ln for ln in fig.axes[1].get_lines()}
    # the undefended model sits at α = 1; vit's missing exact σ₁ at α = 1e4 is left out
    np.testing.assert_array_equal(lines["σ₁ exact"].get_xdata(), [1.0, 1e2])
    np.testing.assert_allclose(lines["σ₁ exact"].get_ydata(), [3.0, 300.0])
    np.testing.assert_allclose(lines["bound: block"].get_ydata(), [2.1, 210.0, 21000.0])
    assert plots.sigma_vs_alpha([], tmp_path / "empty.png") is None


def test_gap_vs_alpha_marks_refusals(tmp_path: Path, figures: list[Figure]) -> None:
    rows = [
        {"kind": "utility", "model": "mlp", "dtype": dtype, "alpha": alpha,
         "function_gap": gap * alpha, "guard_accepted": gap * alpha <= 5e-2}
        for dtype, gap in (("float32", 1e-7), ("bfloat16", 1e-3))
        for alpha in (1e1, 1e3, 1e5)
    ]  # fmt: skip
    _png(plots.gap_vs_alpha(rows, tmp_path / "gap.png") or Path("missing"))
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "mlp"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bfloat16", "float32"]
    (refused,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    expected = [(r["alpha"], r["function_gap"]) for r in rows if not r["guard_accepted"]]
    np.testing.assert_allclose(refused.get_offsets(), expected)  # bfloat16 at 1e3 and 1e5
    assert plots.gap_vs_alpha([], tmp_path / "empty.png") is None

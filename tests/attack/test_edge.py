"""The stability edge on a problem whose edge is known exactly: least squares, where plain
gradient descent diverges iff lr > 2/λ_max(H) with H = 2XᵀX/n (float64, eigvalsh oracle)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from specdef.attack.edge import curvature_ceiling, stability_edge
from specdef.attack.loop import AttackSpec
from specdef.errors import SpecdefError

Batch = dict[str, torch.Tensor]


class LeastSquares:
    """Full-batch least squares ``mean((Xw − y)²)`` on 64 float64 examples with spread-out
    feature scales (so λ_max and λ_min differ by ~10³)."""

    name = "least-squares"
    kind = "regression"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        scales = torch.tensor([3.0, 1.0, 1.0, 0.5, 0.1], dtype=torch.float64)
        self.x = torch.randn(64, 5, generator=g, dtype=torch.float64) * scales
        self.y = self.x @ torch.randn(5, 1, generator=g, dtype=torch.float64)

    def train_batches(self, *, batch_size: int, seed: int) -> Iterator[Batch]:
        while True:
            yield {"x": self.x, "y": self.y}

    def eval_splits(self) -> dict[str, Sequence[Batch]]:
        return {"train": [{"x": self.x, "y": self.y}]}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    def evaluate(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        with torch.no_grad():
            return {"loss": float(self.loss(model, batches[0]))}


TASK = LeastSquares()
EXACT = 2.0 / float(torch.linalg.eigvalsh(2.0 * TASK.x.T @ TASK.x / 64).max())


def build() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(5, 1, bias=False).double()


def test_ceiling_is_two_over_lambda_max() -> None:
    ceiling = curvature_ceiling(build(), TASK, AttackSpec(optimizer="sgd", batch_size=64))
    # Lanczos gives a lower bound on λ_max, so the ceiling is ≥ the exact one, and close to it
    assert EXACT * (1 - 1e-12) <= ceiling.lr <= EXACT * (1 + 1e-6)
    assert ceiling.converged and ceiling.hvps <= 20


def test_gd_edge_brackets_two_over_lambda_max() -> None:
    spec = AttackSpec(optimizer="sgd", batch_size=64)
    edge = stability_edge(build, TASK, spec, horizon=300, tol_decades=0.01)
    assert edge.edge is not None and edge.diverging is not None
    # the bracket [stable, diverging) holds the exact edge (up to the ceiling's 1e-6: a rate that
    # close above it grows by 1 + 1e-6 per step, invisible in 300 steps) and spans ≤ 0.01 decades
    assert edge.edge <= EXACT * (1 + 1e-6) and edge.diverging > EXACT
    assert math.log10(edge.diverging / edge.edge) <= 0.01 + 1e-12
    assert edge.ratio == pytest.approx(edge.edge / EXACT, rel=1e-6)
    # every probe is on the side of 2/λ_max that theory says (GD on a quadratic)
    for probe in edge.probes:
        assert (probe.diverged_at is not None) == (probe.lr > EXACT * (1 + 1e-6)), probe
    assert edge.to_dict()["probes"][0]["lr"] == pytest.approx(EXACT, rel=1e-6)


def test_censored_edges() -> None:
    spec = AttackSpec(optimizer="sgd", batch_size=64)
    # 2/λ_max ≈ 0.113: every lr in [0.2, 1] diverges, none in [1e-6, 1e-3] does
    below = stability_edge(build, TASK, spec, horizon=100, lr_min=0.2, lr_max=1.0)
    assert (
        below.edge is None and below.diverging == 0.2 and "every probed lr diverged" in str(below)
    )
    above = stability_edge(build, TASK, spec, horizon=100, lr_min=1e-6, lr_max=1e-3)
    assert above.diverging is None and above.edge == 1e-3 and "no probed lr diverged" in str(above)
    with pytest.raises(SpecdefError, match="lr_min < lr_max"):
        stability_edge(build, TASK, spec, lr_min=1.0, lr_max=0.5)

"""SPSA / MeZO and SGLD against hand computations with the same random draws."""

from __future__ import annotations

import math

import torch
from torch import nn

from specdef.attack.stochastic import SGLD, SPSA

F64 = torch.float64


class _Quadratic:
    """loss(model, batch) = ½‖A·w − b‖² for a model holding one parameter w."""

    kind = "regression"

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b

    def loss(self, model: nn.Module, batch: object) -> torch.Tensor:
        return 0.5 * ((self.a @ model.w - self.b) ** 2).sum()


class _Holder(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())


def test_spsa_step_matches_a_hand_computed_two_point_estimate() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    w0 = torch.randn(3, generator=gen, dtype=F64)
    task, model = _Quadratic(a, b), _Holder(w0)
    lr, eps, wd = 0.05, 1e-3, 0.1
    opt = SPSA(list(model.parameters()), lr=lr, eps=eps, perturbations=2, weight_decay=wd,
               model=model)  # fmt: skip
    opt.observe(task, [None])  # type: ignore[arg-type, list-item]

    torch.manual_seed(7)
    seeds = [int(torch.randint(0, 2**62, ())) for _ in range(2)]  # what step() draws
    f = lambda w: float(0.5 * ((a @ w - b) ** 2).sum())  # noqa: E731
    expected, values = w0 * (1 - lr * wd), []
    for seed in seeds:
        z = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=F64)
        plus, minus = f(w0 + eps * z), f(w0 - eps * z)
        values += [plus, minus]
        expected = expected - lr * (plus - minus) / (2 * eps) / 2 * z

    torch.manual_seed(7)
    reported = opt.step()
    torch.testing.assert_close(model.w.detach(), expected, atol=1e-12, rtol=0)
    assert math.isclose(float(reported), sum(values) / 4, rel_tol=1e-12)


def test_spsa_descends_a_quadratic_in_expectation() -> None:
    # the two-point estimate is unbiased for ∇f·z z, so many small steps reduce the loss
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 4, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    model = _Holder(torch.zeros(4, dtype=F64))
    task = _Quadratic(a, b)
    opt = SPSA(list(model.parameters()), lr=0.02, eps=1e-4, perturbations=4, model=model)
    opt.observe(task, [None])  # type: ignore[arg-type, list-item]
    torch.manual_seed(0)
    start = float(task.loss(model, None))
    for _ in range(200):
        opt.step()
    optimum = float(task.loss(_Holder(torch.linalg.lstsq(a, b).solution), None))
    assert float(task.loss(model, None)) - optimum < 0.05 * (start - optimum)


def test_sgld_step_is_gradient_step_plus_scaled_noise() -> None:
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    model = _Holder(w0)
    lr, noise, wd = 0.1, 0.3, 0.01
    opt = SGLD(list(model.parameters()), lr=lr, noise=noise, weight_decay=wd)
    model.w.grad = torch.tensor([0.2, 0.4, -0.6], dtype=F64)
    torch.manual_seed(3)
    xi = torch.randn(3, dtype=F64)
    torch.manual_seed(3)
    opt.step()
    expected = w0 - lr * (torch.tensor([0.2, 0.4, -0.6], dtype=F64) + wd * w0)
    expected = expected + noise * math.sqrt(2 * lr) * xi
    torch.testing.assert_close(model.w.detach(), expected, atol=1e-14, rtol=0)

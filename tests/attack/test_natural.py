"""K-FAC is invariant to SpecDef's reparameterization as damping → 0 (docs/theory.md, "Which
optimizers the reparameterization cannot see"): one undamped K-FAC step on a defended layer pair
(W̃ = T·W, C = T⁻¹) moves the effective weight C·W̃ exactly as on the undefended pair (W, I)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specdef.attack.loop import AttackSpec, run_attack
from specdef.attack.natural import KFAC, GaussNewtonCG, truncated_cg
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import DefendedLinear
from specdef.errors import SpecdefError
from specdef.linalg.spectral import spectral_deform
from specdef.zoo import load_model, load_task

F64 = torch.float64


class _Regression:
    """A float64 regression task in the Task shape the optimizers read (MSE targets)."""

    kind = "classification"


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    # m ≤ n for both layers and batch ≫ widths: every Kronecker factor is full rank
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()


def _slots(model: nn.Sequential, *, alpha: float | None) -> nn.Sequential:
    """Each Linear → a DefendedLinear: deformed by ``alpha`` (top-2), or the identity slot."""
    out = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            slot = DefendedLinear.identity_slot(layer, top_k=2)
            if alpha is not None:
                inflated, compensation = spectral_deform(layer.weight.detach(), alpha, 2)
                with torch.no_grad():
                    slot.inflated.weight.copy_(inflated)
                    slot.compensation.weight.copy_(compensation)
            out.append(slot)
        else:
            out.append(layer)
    return nn.Sequential(*out)


def _fused(model: nn.Sequential) -> list[torch.Tensor]:
    return [m.fused_weight() for m in model if isinstance(m, DefendedLinear)]


def _one_kfac_step(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, damping: float) -> None:
    opt = KFAC(list(model.parameters()), model=model, lr=1.0, damping=damping)
    opt.observe(_Regression(), [{"x": x, "y": y}])  # type: ignore[arg-type]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss.detach()

    opt.step(closure)


def _step_gap(damping: float, alpha: float = 100.0) -> tuple[float, float]:
    """(relative gap of the effective-weight steps, relative gap of the functions after the step)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=gen, dtype=F64)
    y = torch.randn(512, 4, generator=gen, dtype=F64)
    base = _mlp(0)
    defended, plain = _slots(base, alpha=alpha), _slots(base, alpha=None)
    before = _fused(plain)
    _one_kfac_step(defended, x, y, damping)
    _one_kfac_step(plain, x, y, damping)
    step_gap = max(
        float((d - p).norm() / (p - b).norm())
        for d, p, b in zip(_fused(defended), _fused(plain), before, strict=True)
    )
    with torch.no_grad():
        out_d, out_p = defended(x), plain(x)
    return step_gap, float((out_d - out_p).norm() / out_p.norm())


def test_undamped_kfac_step_is_invariant_to_the_reparameterization() -> None:
    step_gap, function_gap = _step_gap(1e-12, alpha=10.0)
    assert step_gap <= 1e-8
    assert function_gap <= 1e-8


def test_damping_breaks_the_invariance_in_proportion_to_damping_times_alpha_squared() -> None:
    # the gap is ≈ c·λ·α² (docs/theory.md): linear in λ, quadratic in α, until it saturates
    small, _ = _step_gap(1e-12, alpha=10.0)
    damped, function_gap = _step_gap(1e-2, alpha=10.0)
    assert damped > 1e6 * small and function_gap > 1e-2
    mid, _ = _step_gap(1e-8, alpha=10.0)
    assert 3e3 < mid / small < 3e4
    stronger, _ = _step_gap(1e-8, alpha=100.0)
    assert 30 < stronger / mid < 300


def test_truncated_cg_solves_a_spd_system() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 5, generator=gen, dtype=F64)
    a = q @ q.T + 5 * torch.eye(5, dtype=F64)
    b = torch.randn(5, generator=gen, dtype=F64)
    (x,) = truncated_cg(lambda v, _: [a @ v[0]], [b], iters=10, tol=1e-14)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-10, rtol=0)


def test_ggn_cg_step_matches_a_dense_gauss_newton_solve() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = (
        torch.randn(64, 3, generator=gen, dtype=F64),
        torch.randn(64, 2, generator=gen, dtype=F64),
    )
    model = nn.Linear(3, 2).double()
    w0 = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    opt = GaussNewtonCG(list(model.parameters()), model=model, lr=1.0, damping=0.1, cg_iters=50,
                        cg_tol=1e-14)  # fmt: skip
    opt.observe(_Regression(), [{"x": x, "y": y}])  # type: ignore[arg-type]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss.detach()

    # oracle: for a linear model with MSE the GGN is the Hessian, built densely in float64
    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:6].view(2, 3), theta[6:]
        return nn.functional.mse_loss(x @ w.T + b, y)

    hess = torch.autograd.functional.hessian(loss_of, w0)
    grad = torch.autograd.functional.jacobian(loss_of, w0)
    expected = w0 - torch.linalg.solve(hess + 0.1 * torch.eye(8, dtype=F64), grad)
    opt.step(closure)
    got = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_steps_reduce_the_loss(kind: str) -> None:
    gen = torch.Generator().manual_seed(5)
    x, y = (
        torch.randn(256, 8, generator=gen, dtype=F64),
        torch.randn(256, 4, generator=gen, dtype=F64),
    )
    model = _mlp(2)
    opt = KFAC(list(model.parameters()), model=model, lr=0.5, damping=1e-3, kind=kind)
    opt.observe(_Regression(), [{"x": x, "y": y}])  # type: ignore[arg-type]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss.detach()

    first = float(closure())
    for _ in range(5):
        opt.step(closure)
    assert float(closure()) < 0.9 * first


def test_kfac_breaks_the_defended_mlp_digits_as_fast_as_the_undefended_one() -> None:
    # measured (docs/theory.md §8): damped K-FAC, empirical Fisher, batch 256 — α = 1e4 on every
    # layer (top-8) does not slow it down; both reach 90 % harmful accuracy within 10 steps
    spec = AttackSpec(optimizer="kfac", lr=0.3, steps=20, batch_size=256, eval_every=5,
                      threshold="harmful_accuracy>=0.9", stop_at_threshold=True,
                      optimizer_kwargs={"damping": 1e-2, "damping_floor": 1e-2,
                                        "fisher_type": "empirical"})  # fmt: skip
    task = load_task("digits-harmful")
    plain = run_attack(load_model("mlp-digits"), task, spec)
    defended_model = load_model("mlp-digits")
    report = apply_specdef_(defended_model, SpecDefConfig(alpha=1e4, top_k=8))
    assert len(report.layers) == 3
    defended = run_attack(defended_model, task, spec)
    assert plain.outcome is not None and defended.outcome is not None
    assert plain.outcome.steps is not None and defended.outcome.steps is not None
    assert defended.outcome.steps <= plain.outcome.steps <= 10


def test_kfac_refuses_parameters_outside_linear_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(SpecdefError, match=r"nn.Linear / nn.Conv2d parameters only.*1\.weight"):
        KFAC(list(model.parameters()), model=model)

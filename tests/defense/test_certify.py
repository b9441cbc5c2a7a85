"""Certified lower bounds on a defended MLP against the exact σ₁ of its dense float64 Hessian, their
growth in α, and the invariance of the untouched block's Hessian under the defense."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from specdef.architectures import MLP
from specdef.curvature import HessianOperator, dense_hessian, lanczos
from specdef.curvature.lr import lr_ceiling, predicted_slowdown
from specdef.defense.apply import apply_specdef_
from specdef.defense.certify import defense_certificate, spectral_lower_bound
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import DefendedLinear, parameter_roles, set_submodule
from specdef.errors import SpecdefError

ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)
LAYER = "layers.2"


def classify(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float64), torch.tensor(y)
    torch.manual_seed(0)
    model = MLP(64, (8, 8), 10, activation="tanh").double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        idx = torch.arange(step * 20, step * 20 + 64) % 1500
        opt.zero_grad()
        classify(model, {"x": x[idx], "y": y[idx]}).backward()
        opt.step()
    return model, [{"x": x[1500:1564], "y": y[1500:1564]}]


def _defend(model: torch.nn.Module, alpha: float) -> torch.nn.Module:
    out = copy.deepcopy(model)
    if alpha > 1:
        apply_specdef_(out, SpecDefConfig(alpha=alpha, top_k=2, targets=(LAYER,)))
        return out
    # α = 1: the identity slot, W̃ = W and C = I
    set_submodule(out, LAYER, DefendedLinear.identity_slot(out.get_submodule(LAYER), top_k=2))
    return out


def test_certificate_and_bound_below_exact_and_growing(trained) -> None:  # type: ignore[no-untyped-def]
    base, batches = trained
    rows = []
    for alpha in ALPHAS:
        model = _defend(base, alpha)
        exact = float(torch.linalg.eigvalsh(dense_hessian(model, classify, batches)).abs().max())
        bound = spectral_lower_bound(model, classify, batches, top=2)
        cert = defense_certificate(model, classify, batches, top=2, spectral=bound)
        assert 0 < bound.value <= exact * (1 + 1e-9)
        assert 0 < cert.value <= exact * (1 + 1e-9)
        assert cert.value >= bound.value * (1 - 1e-9)  # it contains the bound's own direction
        assert cert.hvps == 4 + 2  # top² ũ_j ũ_iᵀ directions + 2 optimal a_i ũ_iᵀ
        rows.append((exact, cert.value, bound.value, bound.pairs[0].bound.kappas[0]))
    for (e0, c0, b0, k0), (e1, c1, b1, k1) in itertools.pairwise(rows):
        assert e1 >= 10 * e0 and c1 >= 10 * c0 and b1 >= 10 * b0  # at least linear in α
        assert b1 == pytest.approx(100 * b0, rel=1e-6)  # exactly σ₁(W̃)² = α²σ₁(W)²
        assert k1 == pytest.approx(k0, rel=1e-6)  # κ is defense-invariant
    assert rows[-1][0] == pytest.approx(100 * rows[-2][0], rel=1e-2)  # exact: α² once dominant


def test_untouched_hessian_unchanged_by_defense(trained) -> None:  # type: ignore[no-untyped-def]
    base, batches = trained
    model = _defend(base, 100.0)
    roles = parameter_roles(model)
    untouched = [n for n, r in roles.items() if r == "untouched"]
    assert set(untouched) == {n for n, _ in base.named_parameters() if not n.startswith(LAYER)}
    defended = dense_hessian(model, classify, batches, block=untouched)
    reference = dense_hessian(base, classify, batches, block=untouched)
    assert float((defended - reference).norm() / reference.norm()) < 1e-10
    # ... while the full Hessian's top eigenvalue moved by orders of magnitude
    full_d = HessianOperator(model, classify, batches)
    full_u = HessianOperator(base, classify, batches)
    top_d = lanczos(full_d, which="LA", tol=1e-8).eigenvalues[0]
    top_u = lanczos(full_u, which="LA", tol=1e-8).eigenvalues[0]
    slow = predicted_slowdown(top_u, top_d)
    assert slow.factor > 100 and slow.lr_defended == pytest.approx(2 / top_d)
    assert lr_ceiling(-1.0) == float("inf")


def test_bounds_need_a_defended_model(trained) -> None:  # type: ignore[no-untyped-def]
    base, batches = trained
    with pytest.raises(SpecdefError, match="no defended layers"):
        spectral_lower_bound(base, classify, batches)

"""Optimizer registry: every entry trains a real model through the one attack loop, capability
flags match what the optimizer needs, and unknown names get a "did you mean"."""

from __future__ import annotations

import pytest
import torch

from _attack_helpers import digits_task
from specdef.architectures import MLP
from specdef.attack.loop import AttackSpec, run_attack
from specdef.attack.natural import BatchAware
from specdef.attack.optim import OPTIMIZERS, CompositeOptimizer, NewtonCG, make_optimizer
from specdef.errors import SpecdefError

# A reasonable learning rate per optimizer (what a practitioner would try first).
LR = {
    "sgd": 0.5,
    "sgd-momentum": 0.05,
    "nesterov": 0.05,
    "adam": 1e-2,
    "adamw": 1e-2,
    "adagrad": 0.05,
    "rmsprop": 3e-3,
    "muon": 0.05,
    "adahessian": 0.1,
    "sophiah": 1.0,
    "newton-cg": 1.0,
    "kfac": 0.03,
    "ekfac": 0.03,
    "ggn-cg": 0.3,
    "shampoo": 0.1,
    "soap": 0.03,
    "kron": 0.03,
    "lion": 0.01,
    "signsgd": 0.01,
    "sgld": 0.5,
}
# zeroth-order: ~2k parameters from scratch in 40 steps is beyond a two-point estimator; SPSA is
# checked against a hand computation and on a pretrained model (tests/attack/test_stochastic.py)
ZEROTH_ORDER = {"spsa"}


def test_lr_table_covers_registry() -> None:
    assert set(LR) | ZEROTH_ORDER == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(LR))
def test_every_optimizer_reduces_loss_on_digits(name: str) -> None:
    torch.manual_seed(0)
    model = MLP(64, (32,), 10)
    task = digits_task(range(10))
    spec = AttackSpec(optimizer=name, lr=LR[name], steps=40, batch_size=64, eval_every=40)
    result = run_attack(model, task, spec)
    start, end = result.evals[0]["harmful_loss"], result.evals[-1]["harmful_loss"]
    assert result.diverged_at is None
    assert result.steps_run == 40
    # held-out loss at least halves from the untrained ≈ ln 10 within 40 updates
    assert end < 0.5 * start, (name, start, end)
    assert result.evals[-1]["harmful_accuracy"] > 0.6


def test_unknown_optimizer_suggests() -> None:
    with pytest.raises(SpecdefError, match=r"Unknown optimizer 'adamww'\. Did you mean: adamw"):
        AttackSpec(optimizer="adamww")


def test_flags_match_optimizers() -> None:
    model = MLP(64, (32,), 10)
    for name, entry in OPTIMIZERS.items():
        opt, _ = make_optimizer(name, model, lr=1e-3)
        assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
        if entry.needs_closure:
            with pytest.raises(SpecdefError, match=r"closure|batches"):
                opt.step()
        assert isinstance(opt, BatchAware) == entry.needs_batch
        assert (getattr(opt, "model", None) is model) == entry.needs_model
    assert OPTIMIZERS["adahessian"].needs_create_graph and OPTIMIZERS["sophiah"].needs_create_graph
    assert not OPTIMIZERS["adam"].needs_create_graph


def test_muon_splits_hidden_matrices_from_the_rest() -> None:
    model = MLP(64, (32,), 10)
    opt, entry = make_optimizer("muon", model, lr=0.02)
    assert entry.splits_matrices and isinstance(opt, CompositeOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert all(p.ndim == 1 for g in adamw.param_groups for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_newton_cg_solves_a_quadratic_in_one_step() -> None:
    # f(x) = ½ xᵀAx − bᵀx: one undamped Newton step from 0 lands on A⁻¹b (CG is exact in n steps).
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = q @ q.T + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = NewtonCG([x], lr=1.0, damping=0.0, cg_iters=5, cg_tol=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward(create_graph=True)
        return loss

    opt.step(closure)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


def test_bad_optimizer_kwargs_are_a_user_error() -> None:
    with pytest.raises(SpecdefError, match="Bad keyword arguments for optimizer 'adam'"):
        make_optimizer("adam", MLP(64, (8,), 10), lr=1e-3, kwargs={"betaz": (0.9, 0.9)})

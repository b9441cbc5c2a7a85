"""Every registry entry's declared search space builds a working optimizer: for each optimizer,
trials sampled by a seeded TPE study become attack specs whose optimizer takes a real step."""

from __future__ import annotations

import optuna
import pytest
import torch

from _attack_helpers import digits_task
from specdef.architectures import MLP
from specdef.attack.loop import AttackSpec, run_attack
from specdef.attack.optim import OPTIMIZERS, assemble_kwargs, make_optimizer
from specdef.attack.search import COMMON_SPACE, SearchConfig, search_space, trial_spec
from specdef.attack.search.storage import pruner
from specdef.errors import SpecdefError

TASK = digits_task(range(5, 10))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sampled_specs_build_and_step(name: str) -> None:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    base = AttackSpec(steps=4, batch_size=16, eval_every=2, threshold="harmful_accuracy>=0.9")
    config = SearchConfig(trials=1)
    space = search_space(name)
    assert set(COMMON_SPACE) <= set(space) and set(OPTIMIZERS[name].search_space) <= set(space)
    for _ in range(3):
        trial = study.ask()
        spec = trial_spec(trial, base, config, name)
        assert spec.optimizer == name and 1e-12 <= spec.lr <= 1
        assert set(trial.params) == {"lr", *space}
        assert spec.warmup_steps == round(trial.params["warmup"] * base.steps)
        torch.manual_seed(0)
        model = MLP(64, (16,), 10)
        make_optimizer(name, model, lr=spec.lr, kwargs=spec.optimizer_kwargs)
        result = run_attack(model, TASK, spec)
        assert result.steps_run >= 1 and result.outcome is not None
        study.tell(trial, 1.0)


def test_assemble_kwargs_and_errors() -> None:
    got = assemble_kwargs({"betas.1": 0.99, "betas.0": 0.9, "eps": 1e-8})
    assert got == {"betas": (0.9, 0.99), "eps": 1e-8}
    with pytest.raises(SpecdefError, match=r"numbered 0\.\.0"):
        assemble_kwargs({"betas.1": 0.99})


def test_pruners_follow_the_config() -> None:
    base = AttackSpec(steps=400, eval_every=10)
    halving = pruner(SearchConfig(trials=1), base)
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)
    assert halving._min_resource == 50  # max(eval_every, steps / 8)
    band = pruner(SearchConfig(trials=1, pruner="hyperband", min_resource=20), base)
    assert isinstance(band, optuna.pruners.HyperbandPruner) and band._max_resource == 400
    assert isinstance(pruner(SearchConfig(trials=1, pruner="none"), base), optuna.pruners.NopPruner)
    with pytest.raises(SpecdefError, match="pruner in"):
        SearchConfig(trials=1, pruner="median")

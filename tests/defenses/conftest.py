"""Shared subjects: ``mlp-digits`` after it has learned all ten digits (so there is harmful
knowledge, digits 5–9, to remove) and the stock forget / retain data."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from specdef import zoo
from specdef.attack.loop import AttackSpec, run_attack
from specdef.defenses.data import DefenseData, load_defense_data


@pytest.fixture(scope="session")
def knowing_mlp() -> nn.Module:
    """mlp-digits fine-tuned 150 AdamW steps on all ten digits (held-out harmful accuracy ≈ 0.9)."""
    model = zoo.load_model("mlp-digits")
    spec = AttackSpec(optimizer="adamw", lr=3e-3, steps=150, batch_size=64, eval_every=150)
    run_attack(model, zoo.load_task("digits"), spec)
    return model


@pytest.fixture
def mlp(knowing_mlp: nn.Module) -> nn.Module:
    return copy.deepcopy(knowing_mlp)


@pytest.fixture(scope="session")
def digits_data() -> DefenseData:
    return load_defense_data("classification", eval_limit=None)

"""Shared fixtures for the attack-harness tests: scikit-learn digits split into a "pretraining"
half (digits 0–4) and an "attack" half (digits 5–9), and a small MLP pretrained on 0–4."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdef.architectures import MLP
from specdef.tasks import ClassificationTask


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    heldout = torch.zeros(len(y), dtype=torch.bool)
    heldout[::2] = True  # every other example (after a fixed shuffle) is held out
    return x, y, heldout


def digits_task(
    classes: range | tuple[int, ...], *, benign: range | tuple[int, ...] = ()
) -> ClassificationTask:
    """Train on the training half of ``classes``; held-out "harmful" = the other half of ``classes``,
    "benign" = the held-out half of ``benign`` classes (if any)."""
    x, y, heldout = _digits()
    want = torch.isin(y, torch.tensor(list(classes)))
    splits = {"harmful": (x[want & heldout], y[want & heldout])}
    if benign:
        keep = torch.isin(y, torch.tensor(list(benign))) & heldout
        splits["benign"] = (x[keep], y[keep])
    return ClassificationTask(
        name=f"digits-{min(classes)}-{max(classes)}",
        train=(x[want & ~heldout], y[want & ~heldout]),
        heldout=splits,
    )


@functools.cache
def _pretrained_state(hidden: tuple[int, ...]) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLP(64, hidden, 10)
        x, y = digits_task(range(5)).train
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained_mlp(hidden: tuple[int, ...] = (64, 64)) -> nn.Module:
    """A fresh copy of an MLP trained on digits 0–4 (≈ 98 % held-out accuracy on 0–4)."""
    model = MLP(64, hidden, 10)
    model.load_state_dict(copy.deepcopy(_pretrained_state(hidden)))
    return model


def post_attack_harmful_loss(model: nn.Module, task: Any, *, lr: float, batch_size: int) -> float:
    """A fixed short attack on a copy of ``model`` (5 SGD steps at ``lr`` on ``task``), then the
    held-out harmful loss: what a tamper-resistance defense should keep high."""
    from specdef.attack.loop import AttackSpec, run_attack

    spec = AttackSpec(optimizer="sgd", lr=lr, steps=5, batch_size=batch_size, eval_every=5)
    result = run_attack(copy.deepcopy(model), task, spec)
    assert result.diverged_at is None  # a diverged attack would leave the start loss standing
    return float(result.evals[-1]["harmful_loss"])

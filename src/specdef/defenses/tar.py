"""A small TAR: tamper-resistant training by adversarial meta-learning (Tamirisa et al. 2024,
"Tamper-Resistant Safeguards for Open-Weight LLMs", ICLR 2025).

Each outer step simulates an attacker: ``inner_steps`` SGD steps on the harmful cross-entropy from
the current weights θ, giving θ'. The outer loss is the tamper-resistance loss at θ' — the negative
entropy of the model's predictions on held-out harmful examples (TAR's choice for knowledge
restriction: the attacked model should stay uncertain) — plus the retain loss at θ:
``L(θ) = tamper_weight · (−H(p_θ'(·|x_f))) + retain_weight · CE_θ(retain)``.
The meta-gradient is first-order (the inner gradients are detached, so ∂θ'/∂θ = I), as in TAR's
implementation; the adversary's learning rate is drawn per outer step from ``inner_lrs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specdef.defenses import features
from specdef.defenses.data import DefenseData, TrainedConfig, train_defense
from specdef.defenses.registry import Defended, DefenseEntry
from specdef.errors import SpecdefError
from specdef.tasks import Batch


@dataclass(frozen=True)
class TARConfig(TrainedConfig):
    """inner_steps: SGD steps of the simulated attack; inner_lrs: its learning rates (one drawn
    per outer step); tamper_weight / retain_weight: the outer loss's two terms."""

    steps: int = 100
    inner_steps: int = 4
    inner_lrs: tuple[float, ...] = (0.05, 0.1, 0.2)
    tamper_weight: float = 1.0
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps < 1 or not self.inner_lrs or min(self.inner_lrs) <= 0:
            raise SpecdefError(
                f"tar: expected inner_steps >= 1 and positive inner_lrs, found {self.inner_steps} "
                f"and {self.inner_lrs}."
            )


def simulated_attack(
    model: nn.Module, batch: Batch, *, steps: int, lr: float
) -> dict[str, torch.Tensor]:
    """θ' after ``steps`` plain SGD steps on the task loss of ``batch``, as a parameter dict that
    keeps the graph to θ with detached inner gradients (first-order meta-learning)."""
    params: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(steps):
        loss = features.loss_from_logits(features.logits(model, batch, params), batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        params = {
            n: p if g is None else p - lr * g.detach()
            for (n, p), g in zip(params.items(), grads, strict=True)
        }
    return params


def tar(model: nn.Module, config: TARConfig, data: DefenseData) -> Defended:
    gen = torch.Generator().manual_seed(config.seed)

    def objective(m: nn.Module, forget: Batch, retain: Batch) -> torch.Tensor:
        half = next(iter(forget.values())).shape[0] // 2
        attack = {k: v[:half] for k, v in forget.items()} if half else forget
        heldout = {k: v[half:] for k, v in forget.items()} if half else forget  # one example
        lr = config.inner_lrs[int(torch.randint(len(config.inner_lrs), (1,), generator=gen))]
        attacked = simulated_attack(m, attack, steps=config.inner_steps, lr=lr)
        tamper = -features.prediction_entropy(features.logits(m, heldout, attacked), heldout)
        return config.tamper_weight * tamper + features.retain_loss(m, retain, config.retain_weight)

    return train_defense(model, data, objective, config)


ENTRIES = (
    DefenseEntry(
        name="tar",
        config=TARConfig,
        apply=tar,
        summary="adversarial meta-learning: keep predictions on harmful data uncertain after a "
        "simulated fine-tuning attack, keep the retain loss",
        cites="Tamirisa et al. 2024, Tamper-Resistant Safeguards for Open-Weight LLMs (ICLR 2025)",
        deviations="first-order meta-gradient through a 4-step SGD adversary (TAR: 64-step AdamW "
        "adversaries from a pool); no initial safeguard stage and no representation-engineering "
        "retain term; tens of outer steps",
        needs_data=True,
    ),
)

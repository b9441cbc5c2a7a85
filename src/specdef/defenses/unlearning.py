"""Unlearning by the output distribution: gradient ascent on the forget data (with a retain term,
"GradDiff") and NPO, negative preference optimization against a frozen reference model.

- Gradient ascent (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in
  Language Models", ACL; GradDiff as in Liu et al. 2022 / Maini et al. 2024, TOFU):
  ``L = −CE(forget) + retain_weight · CE(retain)``.
- NPO (Zhang, Lin, Bai, Mei 2024, "Negative Preference Optimization: From Catastrophic Collapse to
  Effective Unlearning", COLM): ``L = (2/β) E_forget[log(1 + (π_θ(y|x)/π_ref(y|x))^β)]
  + retain_weight · CE(retain)``, with π_ref the model before unlearning (NPO+RT).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdef.defenses import features
from specdef.defenses.data import DefenseData, TrainedConfig, train_defense
from specdef.defenses.registry import Defended, DefenseEntry
from specdef.errors import SpecdefError
from specdef.tasks import Batch


@dataclass(frozen=True)
class GradientAscentConfig(TrainedConfig):
    """retain_weight: weight of the retain cross-entropy (0: plain gradient ascent)."""

    retain_weight: float = 1.0


def gradient_ascent(model: nn.Module, config: GradientAscentConfig, data: DefenseData) -> Defended:
    def objective(m: nn.Module, forget: Batch, retain: Batch) -> torch.Tensor:
        forget_loss = features.loss_from_logits(features.logits(m, forget), forget)
        return -forget_loss + features.retain_loss(m, retain, config.retain_weight)

    return train_defense(model, data, objective, config)


@dataclass(frozen=True)
class NPOConfig(TrainedConfig):
    """beta: NPO's inverse temperature β (the paper's 0.1); retain_weight: the retain term (NPO+RT)."""

    beta: float = 0.1
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise SpecdefError(f"npo: beta must be > 0, found {self.beta}.")


def npo_loss(log_likelihood: torch.Tensor, reference: torch.Tensor, *, beta: float) -> torch.Tensor:
    """``(2/β) mean log(1 + exp(β (log π_θ − log π_ref)))`` — NPO's loss on per-example
    log-likelihoods (softplus is that log, computed stably)."""
    return (2.0 / beta) * F.softplus(beta * (log_likelihood - reference)).mean()


def npo(model: nn.Module, config: NPOConfig, data: DefenseData) -> Defended:
    reference = copy.deepcopy(model).eval().requires_grad_(False)

    def objective(m: nn.Module, forget: Batch, retain: Batch) -> torch.Tensor:
        with torch.no_grad():
            ref = features.log_likelihood(features.logits(reference, forget), forget)
        likelihood = features.log_likelihood(features.logits(m, forget), forget)
        loss = npo_loss(likelihood, ref, beta=config.beta)
        return loss + features.retain_loss(m, retain, config.retain_weight)

    return train_defense(model, data, objective, config)


ENTRIES = (
    DefenseEntry(
        name="gradient-ascent",
        config=GradientAscentConfig,
        apply=gradient_ascent,
        summary="raise the loss on the forget data, keep the retain loss (GradDiff)",
        cites="Jang et al. 2023, Knowledge Unlearning for Mitigating Privacy Risks in Language "
        "Models (ACL); retain term as GradDiff (Maini et al. 2024, TOFU)",
        deviations="tens of steps on digits 5–9 or the 320 harmful Q→A pairs instead of the "
        "paper's corpora; the retain term is on by default (retain_weight=0 is plain GA)",
        needs_data=True,
    ),
    DefenseEntry(
        name="npo",
        config=NPOConfig,
        apply=npo,
        summary="lower the forget data's likelihood relative to the model before unlearning",
        cites="Zhang, Lin, Bai, Mei 2024, Negative Preference Optimization: From Catastrophic "
        "Collapse to Effective Unlearning (COLM), NPO+RT",
        deviations="β=0.1 as in the paper; a classifier's π(y|x) is the label's probability; tens "
        "of steps at CPU scale",
        needs_data=True,
    ),
)

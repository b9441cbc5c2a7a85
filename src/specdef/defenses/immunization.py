"""Condition-number immunization (Zheng, Bai, Bullins, Yeh 2025, "Model Immunization from a
Condition Number Perspective", ICML).

Setting: a feature extractor θ under a linear probe w. The probe's Hessian on data X is
H(θ) = S(θ)ᵀS(θ)/n with S the features (the probe layer's inputs), so its condition number is
κ(S)². Immunization makes the harmful task's κ large and keeps the benign task's small, while
keeping the pre-training (retain) loss:
``L = ill_weight · R_ill(S_harmful) + well_weight · R_well(S_retain) + CE(retain)``, with

- ``R_well(S) = ‖S‖²_F/(2k) − σ_min(S)²/2`` (Nenov et al. 2024): ≥ 0, zero iff all k singular
  values are equal (κ = 1);
- ``R_ill(S) = 1 / (‖S‖²_F/(2k) − σ_min(S)²/2)``, the paper's dual: smallest when σ_min → 0.

Both are applied to S/‖S‖_F, so neither can be met by scaling the features (the paper instead
preconditions the update by K⁻¹), and both are multiplied by 2k so that they share one scale. The feature extractor is everything below the model's last
``nn.Linear`` — the paper's linear-probe setting for a linear extractor, and the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from specdef.defenses import features
from specdef.defenses.data import DefenseData, TrainedConfig, train_defense
from specdef.defenses.registry import Defended, DefenseEntry
from specdef.tasks import Batch


@dataclass(frozen=True)
class ImmunizationConfig(TrainedConfig):
    """ill_weight / well_weight: the two regularizers; retain_weight: the retain loss; probe: the
    linear layer whose inputs are the features (None: the model's last ``nn.Linear``). The batch
    must hold at least as many rows as the features have dimensions (σ_min > 0): examples for a
    classifier, tokens for an LM (the default 256 is for a classifier; an LM needs a few
    sequences, e.g. batch_size=4, since each carries vocabulary-wide logits)."""

    ill_weight: float = 1.0
    well_weight: float = 1.0
    retain_weight: float = 1.0
    probe: str | None = None
    batch_size: int = 256


def _spread(features_: torch.Tensor) -> torch.Tensor:
    """2k·(‖S‖²_F/(2k) − σ_min²/2) of S/‖S‖_F = 1 − k·σ_min²/‖S‖²_F, in [0, 1): 0 iff the k
    singular values are equal. The factor 2k puts both regularizers on one scale (their weights
    absorb it), so one weight does not drown the other's gradient."""
    s = torch.linalg.svdvals(features_.float())
    s = s / torch.linalg.vector_norm(s)
    return 1.0 - s.numel() * s[-1].pow(2)


def r_well(features_: torch.Tensor) -> torch.Tensor:
    """Nenov et al.'s well-conditioning regularizer on normalised features (0 iff κ = 1)."""
    return _spread(features_)


def r_ill(features_: torch.Tensor) -> torch.Tensor:
    """Zheng et al.'s ill-conditioning regularizer on normalised features (falls to 1 as κ → ∞)."""
    return 1.0 / _spread(features_).clamp(min=1e-12)


def probe_features(model: nn.Module, batch: Batch, probe: str) -> torch.Tensor:
    """The probe layer's inputs on ``batch`` as (N, d) rows."""
    return features.representations(model, batch, [probe], inputs=True)[probe]


def condition_number(rows: torch.Tensor) -> float:
    """κ(SᵀS) = (σ_max/σ_min)² of the feature rows in float64, over the singular values above the
    numerical-rank tolerance (σ_max · max(n, d) · eps, as ``torch.linalg.matrix_rank``): gradient
    descent on a least-squares probe never moves along a zero direction (a dead ReLU unit's), so
    the rate is set by the nonzero spectrum."""
    s = torch.linalg.svdvals(rows.detach().double())
    tol = float(s[0]) * max(rows.shape) * torch.finfo(torch.float64).eps
    live = s[s > tol]
    return float((live[0] / live[-1]) ** 2) if live.numel() else float("nan")


def immunization(model: nn.Module, config: ImmunizationConfig, data: DefenseData) -> Defended:
    probe = config.probe or features.probe_layer(model)

    def objective(m: nn.Module, forget: Batch, retain: Batch) -> torch.Tensor:
        loss = config.ill_weight * r_ill(probe_features(m, forget, probe))
        loss = loss + config.well_weight * r_well(probe_features(m, retain, probe))
        return loss + features.retain_loss(m, retain, config.retain_weight)

    def kappas() -> dict[str, float]:
        with torch.no_grad():
            return {
                "harmful_kappa": condition_number(_all_features(model, data.forget, probe)),
                "retain_kappa": condition_number(_all_features(model, data.retain, probe)),
            }

    before = kappas()
    defended = train_defense(model, data, objective, config)
    defended.record["immunization"] = {"probe": probe, "before": before, "after": kappas()}
    return defended


def _all_features(model: nn.Module, task: Any, probe: str) -> torch.Tensor:
    """Features of up to 1024 training examples (a classifier) or of 16 sequences' tokens (an LM:
    hundreds of rows, while the vocabulary-wide logits of 1024 sequences would not fit)."""
    size = 16 if task.kind == "causal-lm" else 1024
    return probe_features(model, next(task.train_batches(batch_size=size, seed=0)), probe)


ENTRIES = (
    DefenseEntry(
        name="condition-number",
        config=ImmunizationConfig,
        apply=immunization,
        summary="raise the condition number of the harmful task's linear-probe Hessian, keep the "
        "benign one's low and the retain loss",
        cites="Zheng, Bai, Bullins, Yeh 2025, Model Immunization from a Condition Number "
        "Perspective (ICML)",
        deviations="regularizers on Frobenius-normalised features instead of the paper's "
        "K⁻¹-preconditioned update; plain AdamW on all of θ; features of the model's last linear "
        "layer (the MLP's 128-unit hidden layer)",
        needs_data=True,
    ),
)

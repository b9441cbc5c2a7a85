"""Defenses that act on hidden representations: RMU (representation misdirection) and RepNoise
(representation noising).

- RMU (Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With
  Unlearning", ICML): at one layer ℓ, push the forget data's activations toward ``c·u`` (u a fixed
  random unit vector) and keep the retain data's activations at the frozen model's:
  ``L = mean‖h_θ(x_f) − c·u‖² + α · mean‖h_θ(x_r) − h_frozen(x_r)‖²``, updating only the
  parameters of the layers just below ℓ.
- RepNoise (Rosati et al. 2024, "Representation Noising: A Defence Mechanism Against Harmful
  Finetuning", NeurIPS): make the harmful data's representations at every layer look like
  Gaussian noise (MMD to N(0, I)) while ascending the harmful loss and keeping the retain loss:
  ``L = CE(retain) + β · Σ_layers MMD²(h(x_f), noise) − α · log CE(forget)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from specdef.defenses import features
from specdef.defenses.data import (
    DefenseData,
    TrainedConfig,
    frozen_except,
    train_defense,
)
from specdef.defenses.registry import Defended, DefenseEntry
from specdef.errors import SpecdefError
from specdef.tasks import Batch


@dataclass(frozen=True)
class RMUConfig(TrainedConfig):
    """layer: the module whose output is misdirected (None: the middle hidden layer, the later one
        of two).
    update: parameter prefixes trained (None: the layer itself and the parametrised modules of
        the one or two layers below it, as the paper updates layers ℓ−2…ℓ).
    steering: c, in units of the layer's mean retain activation norm (the paper's c is absolute).
    alpha: weight of the retain term.
    """

    steps: int = 100
    lr: float = 3e-3
    layer: str | None = None
    update: tuple[str, ...] | None = None
    steering: float = 2.0
    alpha: float = 10.0


def rmu_direction(dim: int, *, seed: int) -> torch.Tensor:
    """The paper's control vector: uniform [0, 1) entries, normalised to unit length."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / torch.linalg.vector_norm(u)).float()


def _rmu_plan(model: nn.Module, config: RMUConfig) -> tuple[str, tuple[str, ...]]:
    layers = features.default_layers(model)
    layer = config.layer or layers[len(layers) // 2]
    features.check_layers(model, [layer])
    if config.update is not None:
        return layer, tuple(config.update)
    blocks = [f"model.layers.{i}" for i in range(len(layers))]
    if layer in blocks:  # a decoder layer: the MLPs of layers ℓ−2…ℓ
        index = blocks.index(layer)
        return layer, tuple(f"{b}.mlp" for b in blocks[max(0, index - 2) : index + 1])
    # a classifier: the parametrised modules that run before the layer's output
    order = [n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))]
    names = [n for n, _ in model.named_modules() if n]
    before = [n for n in order if names.index(n) < names.index(layer)]
    if not before:
        raise SpecdefError(f"rmu: no parameters run before layer {layer!r}; pick a later layer.")
    return layer, tuple(before[-2:])


def rmu(model: nn.Module, config: RMUConfig, data: DefenseData) -> Defended:
    layer, update = _rmu_plan(model, config)
    frozen_model = copy.deepcopy(model).eval().requires_grad_(False)
    retain_batch = next(data.retain.train_batches(batch_size=config.batch_size, seed=config.seed))
    with torch.no_grad():
        norm = features.representations(frozen_model, retain_batch, [layer])[layer].norm(dim=-1)
    width = features.representations(frozen_model, retain_batch, [layer])[layer].shape[-1]
    target = config.steering * float(norm.mean()) * rmu_direction(width, seed=config.seed)

    def objective(m: nn.Module, forget: Batch, retain: Batch) -> torch.Tensor:
        h_forget = features.representations(m, forget, [layer])[layer]
        h_retain = features.representations(m, retain, [layer])[layer]
        with torch.no_grad():
            h_ref = features.representations(frozen_model, retain, [layer])[layer]
        forget_loss = (h_forget - target.to(h_forget)).pow(2).mean()
        retain_loss = (h_retain - h_ref).pow(2).mean()
        return forget_loss + config.alpha * retain_loss

    defended = train_defense(model, data, objective, config, frozen=frozen_except(model, update))
    defended.record["rmu"] = {
        "layer": layer,
        "update": list(update),
        "target_norm": float(target.norm()),
        "seed": config.seed,
    }
    return defended


@dataclass(frozen=True)
class RepNoiseConfig(TrainedConfig):
    """alpha: weight of the harmful ascent term −log CE(forget); beta: weight of the noise term
    (MMD² of each layer's harmful representations to N(0, I)); layers: None = every hidden layer;
    bandwidth: the Gaussian kernel's width, in units of √d (d the representation width)."""

    alpha: float = 1.0
    beta: float = 4.0
    layers: tuple[str, ...] = field(default=())
    bandwidth: float = 1.0


def mmd2(x: torch.Tensor, y: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """The (biased) squared maximum mean discrepancy of rows ``x`` (n×d) and ``y`` (m×d) under
    the Gaussian kernel exp(−‖a − b‖² / (2σ²))."""

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2))

    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


def noise_distance(
    model: nn.Module, batch: Batch, layers: list[str], *, bandwidth: float, seed: int
) -> torch.Tensor:
    """Σ over ``layers`` of MMD²(representations of ``batch``, standard Gaussian noise)."""
    reps = features.representations(model, batch, layers)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for rep in reps.values():
        rep = rep.float()
        noise = torch.randn(rep.shape, generator=gen).to(rep)
        total = total + mmd2(rep, noise, sigma=bandwidth * rep.shape[-1] ** 0.5)
    return total


def repnoise(model: nn.Module, config: RepNoiseConfig, data: DefenseData) -> Defended:
    layers = list(config.layers) or features.default_layers(model)
    features.check_layers(model, layers)
    step = [0]

    def objective(m: nn.Module, forget: Batch, retain: Batch) -> torch.Tensor:
        step[0] += 1
        retain_loss = features.loss_from_logits(features.logits(m, retain), retain)
        harmful_loss = features.loss_from_logits(features.logits(m, forget), forget)
        noise = noise_distance(
            m, forget, layers, bandwidth=config.bandwidth, seed=config.seed + step[0]
        )
        return retain_loss + config.beta * noise - config.alpha * torch.log(harmful_loss)

    probe = next(data.forget.train_batches(batch_size=config.batch_size, seed=config.seed + 7))
    with torch.no_grad():
        before = float(noise_distance(model, probe, layers, bandwidth=config.bandwidth, seed=1))
    defended = train_defense(model, data, objective, config)
    with torch.no_grad():
        after = float(noise_distance(model, probe, layers, bandwidth=config.bandwidth, seed=1))
    defended.record["repnoise"] = {
        "layers": layers,
        "noise_mmd_before": before,
        "noise_mmd_after": after,
    }
    return defended


ENTRIES = (
    DefenseEntry(
        name="rmu",
        config=RMUConfig,
        apply=rmu,
        summary="misdirect the forget data's activations at one layer toward a random direction",
        cites="Li et al. 2024, The WMDP Benchmark: Measuring and Reducing Malicious Use With "
        "Unlearning (ICML), RMU",
        deviations="c is relative to the layer's mean activation norm (the paper's c=6.5 is "
        "absolute on Zephyr-7B); squared distances are averaged over the width; on the MLP the "
        "misdirected layer is a hidden ReLU output and the two linear layers below it train",
        needs_data=True,
    ),
    DefenseEntry(
        name="repnoise",
        config=RepNoiseConfig,
        apply=repnoise,
        summary="turn harmful representations into Gaussian noise, ascend the harmful loss, "
        "keep the retain loss",
        cites="Rosati et al. 2024, Representation Noising: A Defence Mechanism Against Harmful "
        "Finetuning (NeurIPS)",
        deviations="retain = the benign task (the paper pairs harmful questions with refusals); "
        "the ascent term is −log CE so it cannot run away; one Gaussian-kernel MMD per layer "
        "with width √d",
        needs_data=True,
    ),
)

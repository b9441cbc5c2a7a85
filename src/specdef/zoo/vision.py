"""Small vision models pretrained on the benign digits task (classes 0–4) by a fixed recipe.

The weights are cached under a key that hashes the recipe, so changing the recipe retrains, and every
user of a recipe starts from weights trained the same way. Training runs on one thread (CPU matrix
products can split reductions differently across thread counts) and takes a few seconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from specdef.architectures import build_architecture
from specdef.errors import SpecdefError, did_you_mean
from specdef.utils.provenance import provenance
from specdef.zoo._cache import ensure_entry, entry_dir, fingerprint, read_manifest
from specdef.zoo.datasets import load_task

log = logging.getLogger(__name__)

CacheDir = str | os.PathLike[str] | None
_RECIPE_VERSION = 1  # bump when the training loop below changes


@dataclass(frozen=True)
class VisionRecipe:
    """How a zoo vision model is trained: architecture, data, optimiser and schedule."""

    architecture: str  # a name for specdef.architectures.build_architecture
    kwargs: dict[str, Any] = field(hash=False)  # its constructor arguments
    task: str = "digits-benign"  # a specdef.zoo task name (its train split)
    steps: int = 600  # optimiser steps
    batch_size: int = 64
    lr: float = 3e-3  # AdamW learning rate, cosine-decayed to zero
    weight_decay: float = 1e-4
    seed: int = 0  # initial weights and batch order
    description: str = field(default="", compare=False)

    def key(self) -> str:
        spec = asdict(self)
        spec.pop("description")
        return fingerprint({**spec, "version": _RECIPE_VERSION})

    def build(self) -> nn.Module:
        return build_architecture(self.architecture, **self.kwargs)

    def params(self) -> int:
        # Built on the CPU (these models are tiny): the meta device would import torch._dynamo
        # (seconds) at import time; fork_rng leaves the caller's random state untouched.
        with torch.random.fork_rng(devices=[]):
            return sum(p.numel() for p in self.build().parameters())


RECIPES: dict[str, VisionRecipe] = {
    "mlp-digits": VisionRecipe(
        "mlp",
        {"in_features": 64, "hidden": (128, 128), "out_features": 10},
        description="MLP 64-128-128-10 trained on digits 0–4",
    ),
    "cnn-digits": VisionRecipe(
        "cnn",
        {"in_channels": 1, "image_size": 8, "channels": (16, 32), "num_classes": 10, "hidden": 64},
        description="2-conv CNN (16, 32 channels) + 64-unit head trained on digits 0–4",
    ),
    "vit-digits": VisionRecipe(
        "vit",
        {"image_size": 8, "patch_size": 2, "dim": 32, "depth": 2, "heads": 4, "num_classes": 10},
        steps=800,
        lr=2e-3,
        description="ViT (2×2 patches, dim 32, 2 blocks, 4 heads) trained on digits 0–4",
    ),
}


def _recipe(name: str) -> VisionRecipe:
    if name not in RECIPES:
        raise SpecdefError(did_you_mean(name, RECIPES, what="vision model"))
    return RECIPES[name]


def _train(recipe: VisionRecipe) -> tuple[nn.Module, dict[str, float]]:

    task = load_task(recipe.task, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = recipe.build()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.steps)
        batches = task.train_batches(batch_size=recipe.batch_size, seed=recipe.seed)
        model.train()
        for _, batch in zip(range(recipe.steps), batches, strict=False):
            opt.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
            opt.step()
            sched.step()
        model.eval()
        metrics = {
            f"{split}_{k}": v
            for split, batches_ in task.eval_splits().items()
            for k, v in task.evaluate(model, batches_).items()
        }
    finally:
        torch.set_num_threads(threads)
    return model, metrics


def _cache_key(name: str) -> str:
    return f"{name}-{_recipe(name).key()}"


def prepare_vision_model(name: str, *, cache_dir: CacheDir = None, verify: bool = False) -> Path:
    recipe = _recipe(name)

    def build(tmp: Path) -> dict[str, Any]:
        log.info("training %s by recipe %s", name, recipe.key())
        model, metrics = _train(recipe)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
        )
        return {
            "recipe": {**asdict(recipe), "key": recipe.key()},
            "metrics": metrics,
            "params": sum(p.numel() for p in model.parameters()),
            "provenance": provenance(),
        }

    path, _ = ensure_entry("models", _cache_key(name), build, cache_dir=cache_dir, verify=verify)
    return path


def vision_prepared(name: str, *, cache_dir: CacheDir = None) -> bool:
    return read_manifest(entry_dir("models", _cache_key(name), cache_dir=cache_dir)) is not None


def vision_metrics(name: str, *, cache_dir: CacheDir = None) -> dict[str, float]:
    """Held-out metrics recorded when the model was trained (``benign_accuracy``, …)."""
    path = prepare_vision_model(name, cache_dir=cache_dir)
    manifest = read_manifest(path)
    return dict(manifest["meta"]["metrics"]) if manifest else {}


def load_vision_model(name: str, *, dtype: torch.dtype, cache_dir: CacheDir = None) -> nn.Module:
    recipe = _recipe(name)
    path = prepare_vision_model(name, cache_dir=cache_dir)
    model = recipe.build()
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(dtype).eval()

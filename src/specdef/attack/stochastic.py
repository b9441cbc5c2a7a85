"""Attackers whose step is random by design: the zeroth-order SPSA / MeZO step (loss values only,
no gradients) and Langevin dynamics (SGLD: a gradient step plus Gaussian noise).

SPSA needs the step's task and batches to evaluate the loss at perturbed weights, so it is
``BatchAware`` (``specdef.attack.natural``); both draw their noise from the global torch RNG,
which the attack loop forks and seeds with the spec's seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from specdef.errors import SpecdefError
from specdef.tasks import Batch, Task


class SPSA(torch.optim.Optimizer):
    """Zeroth-order SPSA with MeZO's memory trick.

    Per step and perturbation ``k`` (``perturbations`` of them): draw ``z ~ N(0, I)`` (regenerated
    from a seed, never stored), evaluate ``L± = L(θ ± ε z)`` on the step's batches, and estimate
    the directional derivative ``(L₊ − L₋) / 2ε``; then ``θ ← θ − lr·(mean_k[(L₊ − L₋)/2ε · z] +
    wd·θ)``. ``step`` returns the mean of the ``L±`` (an O(ε²) estimate of ``L(θ)``); the closure
    (which would run a backward) is not called.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        eps: float = 1e-3,
        perturbations: int = 1,
        weight_decay: float = 0.0,
        model: nn.Module,
    ) -> None:
        if lr <= 0 or eps <= 0 or perturbations < 1:
            raise SpecdefError(
                f"spsa needs lr > 0, eps > 0, perturbations >= 1; found lr={lr}, eps={eps}, "
                f"perturbations={perturbations}."
            )
        defaults = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.model = model
        self.perturbations = perturbations
        self._loss: Callable[[], float] | None = None

    def observe(self, task: Task, batches: Sequence[Batch]) -> None:
        def loss() -> float:
            return float(sum(float(task.loss(self.model, b)) for b in batches) / len(batches))

        self._loss = loss

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    @staticmethod
    def _perturb_(params: list[nn.Parameter], seed: int, scale: float) -> None:
        gen: dict[torch.device, torch.Generator] = {}
        for p in params:
            if p.device not in gen:
                gen[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            z = torch.randn(p.shape, generator=gen[p.device], device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._loss is None:
            raise SpecdefError(
                "spsa needs the step's batches; call observe(task, batches) before step (the "
                "attack loop does for entries marked needs_batch)."
            )
        group = self.param_groups[0]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        params = self._params()
        seeds = [int(torch.randint(0, 2**62, ())) for _ in range(self.perturbations)]
        slopes, values = [], []
        for seed in seeds:
            self._perturb_(params, seed, eps)
            plus = self._loss()
            self._perturb_(params, seed, -2 * eps)
            minus = self._loss()
            self._perturb_(params, seed, eps)
            slopes.append((plus - minus) / (2 * eps))
            values += [plus, minus]
        if wd:
            for p in params:
                p.mul_(1 - lr * wd)
        for seed, slope in zip(seeds, slopes, strict=True):
            if math.isfinite(slope):
                self._perturb_(params, seed, -lr * slope / self.perturbations)
        return torch.tensor(sum(values) / len(values), dtype=torch.float64)


class SGLD(torch.optim.Optimizer):
    """Stochastic gradient Langevin dynamics: ``θ ← θ − lr·(g + wd·θ) + noise·√(2·lr)·ξ``,
    ``ξ ~ N(0, I)``. ``noise = 1`` is Welling & Teh's sampler at temperature 1 (per-example loss
    scale); smaller values temper it toward SGD."""

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, *, noise: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:  # fmt: skip
        if lr <= 0 or noise < 0:
            raise SpecdefError(f"sgld needs lr > 0, noise >= 0; found lr={lr}, noise={noise}.")
        super().__init__(params, {"lr": lr, "noise": noise, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, noise, wd = group["lr"], group["noise"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(p.grad + wd * p, alpha=-lr)
                if noise:
                    p.add_(torch.randn_like(p), alpha=noise * math.sqrt(2 * lr))
        return loss

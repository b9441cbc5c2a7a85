"""The stability edge: the largest learning rate at which an optimizer does not diverge on a model
within a short horizon, found by bisection in log space from the curvature ceiling ``2/λ_max``.

Gradient descent on a quadratic with Hessian H diverges iff ``η > 2/λ_max(H)``; the ceiling from
the curvature toolkit is therefore the natural place to start, and for plain GD the edge sits at
it. Adaptive optimizers (Adam, Muon) rescale their steps, so their edge can sit decades away from
it; the ratio ``edge / (2/λ_max)`` says how far. "Diverged" is the attack loop's own measurement
(a non-finite loss, or a training loss above ``divergence_factor`` × the first one), so an edge
here is exactly the largest rate at which :func:`~specdef.attack.loop.run_attack` keeps training.

Bisection assumes divergence is monotone in the rate. If the starting rate is stable, the bracket
is searched upward to ``lr_max``; if even ``lr_min`` diverges, or ``lr_max`` is stable, the edge is
*censored* and says so (``edge is None`` / ``diverging is None``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from specdef.attack.loop import AttackResult, AttackSpec, run_attack, select_trainable_
from specdef.curvature.estimators import lanczos
from specdef.curvature.hvp import HessianOperator
from specdef.curvature.lr import lr_ceiling
from specdef.errors import SpecdefError
from specdef.tasks import Task
from specdef.utils.devices import to_device
from specdef.utils.provenance import provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeProbe:
    """One short run: its learning rate and where it diverged (``None``: it did not)."""

    lr: float
    diverged_at: int | None


@dataclass(frozen=True)
class Ceiling:
    """``2/λ_max`` of the training loss over the trainable parameters, from ``hvps`` Lanczos
    steps on ``batches`` × ``batch_size`` training examples (λ_max a lower bound, so the ceiling
    is an upper bound on GD's largest stable rate)."""

    lambda_max: float
    lr: float
    hvps: int
    converged: bool
    batches: int
    batch_size: int


@dataclass(frozen=True)
class StabilityEdge:
    """``edge``: the largest probed rate that did not diverge in ``horizon`` steps (``None``: every
    probe down to ``lr_min`` diverged); ``diverging``: the smallest probed rate that did (``None``:
    ``lr_max`` was stable). The true edge lies in ``[edge, diverging)``."""

    optimizer: str
    edge: float | None
    diverging: float | None
    ceiling: Ceiling
    horizon: int
    lr_min: float
    lr_max: float
    probes: tuple[EdgeProbe, ...]

    @property
    def ratio(self) -> float | None:
        """``edge / (2/λ_max)`` (``None`` when censored below or the ceiling is infinite)."""
        if self.edge is None or not math.isfinite(self.ceiling.lr):
            return None
        return self.edge / self.ceiling.lr

    def __str__(self) -> str:
        c = self.ceiling
        ceiling = f"2/λ_max = {c.lr:.3g} (λ_max ≈ {c.lambda_max:.4g}, {c.hvps} HVPs)"
        if self.edge is None:
            return f"< {self.lr_min:g}: every probed lr diverged within {self.horizon} steps; {ceiling}"
        if self.diverging is None:
            return (
                f"≥ {self.lr_max:g}: no probed lr diverged within {self.horizon} steps; {ceiling}"
            )
        ratio = f"{self.ratio:.3g} × 2/λ_max" if self.ratio is not None else "2/λ_max infinite"
        return (
            f"{self.edge:.3g} (stable; {self.diverging:.3g} diverges within {self.horizon} "
            f"steps) = {ratio}; {ceiling}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "edge": self.edge,
            "diverging": self.diverging,
            "ratio_to_ceiling": self.ratio,
            "lambda_max": self.ceiling.lambda_max,
            "ceiling": self.ceiling.lr,
            "hvps": self.ceiling.hvps,
            "lanczos_converged": self.ceiling.converged,
            "hessian_examples": self.ceiling.batches * self.ceiling.batch_size,
            "hessian_batches": self.ceiling.batches,
            "hessian_batch_size": self.ceiling.batch_size,
            "horizon": self.horizon,
            "lr_min": self.lr_min,
            "lr_max": self.lr_max,
            "probes": [dataclasses.asdict(p) for p in self.probes],
            "text": str(self),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StabilityEdge:
        """Inverse of :meth:`to_dict` (a recorded ``stability-edge`` row's ``stability_edge``)."""
        batches = int(data.get("hessian_batches") or 1)
        size = int(data.get("hessian_batch_size") or data["hessian_examples"] // batches)
        ceiling = Ceiling(
            float(data["lambda_max"]), float(data["ceiling"]), int(data["hvps"]),
            bool(data["lanczos_converged"]), batches, size,
        )  # fmt: skip
        probes = tuple(EdgeProbe(float(p["lr"]), p["diverged_at"]) for p in data["probes"])
        return cls(
            str(data["optimizer"]), data["edge"], data["diverging"], ceiling, int(data["horizon"]),
            float(data["lr_min"]), float(data["lr_max"]), probes,
        )  # fmt: skip


def edge_row(
    rid: str,
    edge: StabilityEdge,
    *,
    model: str,
    task: str,
    info: Mapping[str, Any],
    spec: AttackSpec,
    experiment: str = "attack",
) -> dict[str, Any]:
    """A results row of ``kind: "stability-edge"`` (attack reports skip it; searches reuse it)."""
    return {"run_id": rid, "experiment": experiment, "kind": "stability-edge", "model": model,
            "task": task, **dict(info), "optimizer": edge.optimizer, "spec": spec.to_dict(),
            "stability_edge": edge.to_dict(), "provenance": provenance()}  # fmt: skip


def curvature_ceiling(
    model: nn.Module,
    task: Task,
    spec: AttackSpec,
    *,
    batches: int = 1,
    max_hvps: int = 20,
    tol: float = 1e-3,
) -> Ceiling:
    """``2/λ_max`` of the training loss of ``model`` (trained as ``spec`` says: the Hessian block
    of its trainable parameters) on the first ``batches`` training batches the attack would draw.
    Lanczos (``which="LA"``), as ``specdef curvature`` does; ``model`` is not changed."""
    if batches < 1 or max_hvps < 1:
        raise SpecdefError(f"Expected batches >= 1 and max_hvps >= 1; found {batches}, {max_hvps}.")
    model = select_trainable_(model, spec)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    device = next(model.parameters()).device
    stream = task.train_batches(batch_size=spec.batch_size, seed=spec.seed)
    drawn = [to_device(next(stream), device) for _ in range(batches)]
    op = HessianOperator(model, task.loss, drawn, rows=names)
    res = lanczos(op, k=1, which="LA", max_iter=min(max_hvps, op.shape[0]), tol=tol, seed=spec.seed)
    top = float(res.eigenvalues[0])
    return Ceiling(top, lr_ceiling(top), res.hvps, res.converged, batches, spec.batch_size)


def stability_edge(
    build: Callable[[], nn.Module],
    task: Task,
    spec: AttackSpec,
    *,
    horizon: int = 50,
    lr_min: float = 1e-12,
    lr_max: float = 1.0,
    tol_decades: float = 0.05,
    hessian_batches: int = 1,
    max_hvps: int = 20,
    ceiling: Ceiling | None = None,
    runner: Callable[[nn.Module, Task, AttackSpec], AttackResult] = run_attack,
) -> StabilityEdge:
    """Bisect ``log10(lr)`` for the largest rate at which ``spec.optimizer`` does not diverge.

    Each probe trains a fresh ``build()`` for ``horizon`` steps with ``spec`` (lr replaced, no
    threshold). Start at ``2/λ_max`` (clipped to ``[lr_min, lr_max]``; measured on a fresh model
    unless ``ceiling`` is given); if it diverges the bracket is ``[lr_min, 2/λ_max]``, otherwise
    ``[2/λ_max, lr_max]``; an end of the bracket is probed before bisecting, and bisection stops
    when the bracket spans at most ``tol_decades`` decades.
    """
    if not 0 < lr_min < lr_max or horizon < 1 or tol_decades <= 0:
        raise SpecdefError(
            f"Expected 0 < lr_min < lr_max, horizon >= 1, tol_decades > 0; found lr_min={lr_min}, "
            f"lr_max={lr_max}, horizon={horizon}, tol_decades={tol_decades}."
        )
    if ceiling is None:
        ceiling = curvature_ceiling(build(), task, spec, batches=hessian_batches, max_hvps=max_hvps)
    probes: list[EdgeProbe] = []
    short = dataclasses.replace(
        spec, steps=horizon, eval_every=horizon, threshold=None, stop_at_threshold=False
    )

    def diverges(lr: float) -> bool:
        result = runner(build(), task, dataclasses.replace(short, lr=lr))
        probes.append(EdgeProbe(lr, result.diverged_at))
        log.info("edge %s: lr=%.3g diverged_at=%s", spec.optimizer, lr, result.diverged_at)
        return result.diverged_at is not None

    start = min(max(ceiling.lr, lr_min), lr_max)
    stable: float | None
    unstable: float | None
    if diverges(start):
        unstable, stable = start, (lr_min if start > lr_min and not diverges(lr_min) else None)
    else:
        stable, unstable = start, (lr_max if start < lr_max and diverges(lr_max) else None)
        if unstable is None:
            stable = lr_max
    while stable is not None and unstable is not None:
        if math.log10(unstable / stable) <= tol_decades:
            break
        mid = math.sqrt(stable * unstable)
        if diverges(mid):
            unstable = mid
        else:
            stable = mid
    return StabilityEdge(
        spec.optimizer, stable, unstable, ceiling, horizon, lr_min, lr_max, tuple(probes)
    )

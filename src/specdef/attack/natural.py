"""Natural-gradient and Gauss-Newton steps on curvlinops operators: K-FAC and EKFAC
(``p ← p − lr·(F̂ + λ)⁻¹ g`` with Kronecker-factored curvature of each ``nn.Linear``), and
Gauss-Newton-CG (``(G + λI) d = g`` by truncated CG on exact GGN-vector products).

These need the model, a loss *module* and the step's batches, which a plain ``step(closure)``
does not provide: the registry marks them ``needs_model`` (built with ``model=``) and
``needs_batch`` (the loop calls :meth:`BatchAware.observe` with the task and the step's
micro-batches before ``step``). curvlinops takes ``(X, y)`` tensors and a loss module, so only
classification tasks (``batch = {"x", "y"}``, cross-entropy) are supported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from specdef.errors import SpecdefError
from specdef.tasks import Batch, Task

KINDS = ("kfac", "ekfac")
FISHER_TYPES = ("type-2", "mc", "empirical")


@runtime_checkable
class BatchAware(Protocol):
    """An optimizer that sees the step's task and micro-batches before ``step`` is called."""

    def observe(self, task: Task, batches: Sequence[Batch]) -> None: ...


def curvlinops_data(
    task: Task, batches: Sequence[Batch]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(x, y), …]`` for curvlinops from a classification task's batches."""
    if getattr(task, "kind", None) != "classification":
        raise SpecdefError(
            f"K-FAC / EKFAC / GGN-CG steps support classification tasks (x, y batches and "
            f"cross-entropy); found a {getattr(task, 'kind', type(task).__name__)!r} task. Use "
            "another optimizer (e.g. adamw, shampoo) for language models."
        )
    return [(b["x"], b["y"]) for b in batches]


def truncated_cg(
    matvec: Callable[[list[torch.Tensor], bool], list[torch.Tensor]],
    rhs: list[torch.Tensor],
    *,
    iters: int,
    tol: float,
) -> list[torch.Tensor]:
    """Conjugate gradient for ``A x = rhs`` from ``x = 0``, stopping on non-positive curvature
    (the iterate so far is kept; on the first iteration ``rhs`` itself). ``matvec(v, last)``:
    ``last`` is true on the final product (callers may free graphs then)."""
    x = [torch.zeros_like(r) for r in rhs]
    r = [t.clone() for t in rhs]
    p = [t.clone() for t in rhs]
    rr = _dot(r, r)
    stop = tol**2 * rr
    for i in range(iters):
        ap = matvec(p, i == iters - 1)
        curvature = _dot(p, ap)
        if not bool(curvature > 0):
            return x if i > 0 else [t.clone() for t in rhs]
        step = rr / curvature
        x = [xi + step * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - step * api for ri, api in zip(r, ap, strict=True)]
        rr_new = _dot(r, r)
        if bool(rr_new <= stop):
            break
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p, strict=True)]
        rr = rr_new
    return x


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


def kfac_inverse(
    model: nn.Module,
    params: list[nn.Parameter],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    kind: str = "kfac",
    damping: float = 1e-3,
    damping_floor: float = 0.0,
    fisher_type: str = "type-2",
) -> Any:
    """curvlinops' ``KFACInverseLinearOperator`` of the (E)KFAC curvature of ``params`` (weights
    of ``nn.Linear`` layers and their biases) on ``data``: ``inverse @ [g₁, …]`` is the list
    ``(F̂ + λ)⁻¹ g``. K-FAC damps each factor relative to its scale,
    ``(A + (λ·ā + μ)·I) ⊗ (G + (λ·ḡ + μ)·I)`` with ā, ḡ the factors' mean eigenvalues and μ
    ``damping_floor`` (absolute: a confidently wrong classifier has G ≈ 0, where relative damping
    alone leaves the step unbounded); EKFAC damps the corrected eigenvalues exactly,
    ``(Λ + λ + μ)⁻¹``. The factors are computed on a float64 twin of the model, so ``inverse``
    takes float64 vectors: inflated activations must not turn a numerical failure (a float32
    Cholesky or ``eigh`` that fails) into "the defense holds"."""
    # curvlinops: a maintained K-FAC / EKFAC implementation, imported lazily (≈0.3 s)
    from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

    if kind not in KINDS:
        raise SpecdefError(f"kind must be one of {KINDS}; found {kind!r}.")
    if fisher_type not in FISHER_TYPES:
        raise SpecdefError(f"fisher_type must be one of {FISHER_TYPES}; found {fisher_type!r}.")
    operator_cls = EKFACLinearOperator if kind == "ekfac" else KFACLinearOperator
    model, params, data = _in_float64(model, params, data)
    operator = operator_cls(
        model,
        nn.CrossEntropyLoss() if not _is_mse(data) else nn.MSELoss(),
        params,
        data,
        check_deterministic=False,
        fisher_type=fisher_type,
    )
    if kind == "ekfac":
        return KFACInverseLinearOperator(
            operator, damping=damping + damping_floor, use_exact_damping=True,
            retry_double_precision=True,
        )  # fmt: skip
    inverse = _relative_inverse_class(KFACInverseLinearOperator)(
        operator, damping=damping, retry_double_precision=True
    )
    inverse.damping_floor = damping_floor
    return inverse


def _relative_inverse_class(base: type) -> type:
    """``KFACInverseLinearOperator`` damping each factor F by ``λ·tr(F)/dim(F)``: scale-free, so
    the factors of inflated activations (scale α²) and of tiny gradients are damped alike; an
    absolute λ would swamp one and vanish next to the other. Overrides curvlinops 3.0.1's
    ``_compute_damping`` (pinned in requirements/lock.txt)."""

    class RelativeDampingInverse(base):
        damping_floor = 0.0

        def _compute_damping(
            self, aaT: torch.Tensor | None, ggT: torch.Tensor | None
        ) -> tuple[float, float]:
            def scaled(factor: torch.Tensor | None) -> float:
                if factor is None:
                    return 0.0
                mean = float(factor.trace()) / factor.shape[0]
                return self._damping * mean + self.damping_floor

            return scaled(aaT), scaled(ggT)

    return RelativeDampingInverse


def _in_float64(
    model: nn.Module,
    params: list[nn.Parameter],
    data: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[nn.Module, list[nn.Parameter], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 twin of ``model`` (its parameters matched to ``params`` by name) and the data
    cast to it: factors of inflated activations lose definiteness in float32, and float32
    ``eigh`` fails to converge on rank-deficient factors (small batches)."""
    if all(p.dtype == torch.float64 for p in params):
        return model, params, data
    names = {id(p): n for n, p in model.named_parameters()}
    twin = copy.deepcopy(model).to(torch.float64)
    twin_params = dict(twin.named_parameters())
    cast = [
        (x.to(torch.float64) if x.is_floating_point() else x,
         y.to(torch.float64) if y.is_floating_point() else y)
        for x, y in data
    ]  # fmt: skip
    return twin, [twin_params[names[id(p)]] for p in params], cast


def _is_mse(data: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    # float targets mean regression (MSE); integer labels mean classification (cross-entropy)
    return bool(data) and data[0][1].is_floating_point()


class _ModelStep(torch.optim.Optimizer):
    """Shared shell: parameters, the model, the observed batches, and ``p ← p − lr·d``."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], model: nn.Module) -> None:
        super().__init__(params, defaults)
        self.model = model
        self._data: list[tuple[torch.Tensor, torch.Tensor]] = []

    def observe(self, task: Task, batches: Sequence[Batch]) -> None:
        self._data = curvlinops_data(task, batches)

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def _gradient(self, closure: Callable[[], Any] | None) -> tuple[Any, list[torch.Tensor]]:
        if closure is None:
            raise SpecdefError(f"{type(self).__name__} needs a closure; call step(closure).")
        if not self._data:
            raise SpecdefError(
                f"{type(self).__name__} needs the step's batches; call observe(task, batches) "
                "before step (the attack loop does for entries marked needs_batch)."
            )
        with torch.enable_grad():
            loss = closure()
        wd = self.param_groups[0]["weight_decay"]
        grads = [
            (p.grad.detach() if p.grad is not None else torch.zeros_like(p)) + wd * p.detach()
            for p in self._params()
        ]
        return loss, grads

    @torch.no_grad()
    def _apply(self, direction: list[torch.Tensor]) -> None:
        lr = self.param_groups[0]["lr"]
        for p, d in zip(self._params(), direction, strict=True):
            p.add_(d.to(p.dtype), alpha=-lr)


class KFAC(_ModelStep):
    """K-FAC / EKFAC natural-gradient descent: ``p ← p − lr·(F̂ + λ)⁻¹ (g + wd·p)``.

    The factors are recomputed from the step's batches every ``refresh`` steps (stale factors are
    reused in between, as K-FAC implementations do). All parameters must belong to ``nn.Linear``
    layers (curvlinops' K-FAC covers Linear and Conv2d).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        model: nn.Module,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        kind: str = "kfac",
        damping: float = 1e-3,
        damping_floor: float = 0.0,
        refresh: int = 1,
        fisher_type: str = "type-2",
    ) -> None:
        if lr <= 0 or damping < 0 or damping_floor < 0 or refresh < 1:
            raise SpecdefError(
                f"{kind} needs lr > 0, damping >= 0, damping_floor >= 0, refresh >= 1; found "
                f"lr={lr}, damping={damping}, damping_floor={damping_floor}, refresh={refresh}."
            )
        defaults = {"lr": lr, "weight_decay": weight_decay}
        super().__init__(params, defaults, model)
        _require_kronecker_layers(model, self._params(), kind)
        self.kind, self.damping, self.damping_floor = kind, damping, damping_floor
        self.refresh, self.fisher_type = refresh, fisher_type
        self._inverse: Any = None
        self._steps = 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss, grads = self._gradient(closure)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return torch.tensor(math.nan)  # the loop records the divergence
        if self._inverse is None or self._steps % self.refresh == 0:
            try:
                self._inverse = kfac_inverse(
                    self.model, self._params(), self._data, kind=self.kind,
                    damping=self.damping, damping_floor=self.damping_floor,
                    fisher_type=self.fisher_type,
                )  # fmt: skip
                result = self._inverse @ [g.to(torch.float64) for g in grads]
            except torch.linalg.LinAlgError as err:
                # a numerical failure, not evidence that the defense holds: say so and stop
                raise SpecdefError(
                    f"{self.kind}: a Kronecker factor is not positive definite even in float64 "
                    f"at damping={self.damping:g}, damping_floor={self.damping_floor:g} ({err}); "
                    "raise damping_floor."
                ) from None
        else:
            result = self._inverse @ [g.to(torch.float64) for g in grads]
        self._steps += 1
        self._apply(result)
        return loss


def _require_kronecker_layers(model: nn.Module, params: list[nn.Parameter], kind: str) -> None:
    """K-FAC factors exist for ``nn.Linear`` / ``nn.Conv2d`` parameters only (curvlinops)."""
    covered = {
        id(p) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)
        for p in m.parameters(recurse=False)
    }  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    other = [names.get(id(p), "?") for p in params if id(p) not in covered]
    if other:
        raise SpecdefError(
            f"{kind} preconditions nn.Linear / nn.Conv2d parameters only; found trainable "
            f"{other[:3]}{' …' if len(other) > 3 else ''}. Freeze them (--train, frozen "
            "prefixes) or use another optimizer."
        )


class GaussNewtonCG(_ModelStep):
    """Gauss-Newton-CG: ``(G + damping·I) d = g + wd·p`` by ≤ ``cg_iters`` CG iterations on
    curvlinops' exact GGN-vector products over the step's batches, then ``p ← p − lr·d``."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        model: nn.Module,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        damping: float = 1e-2,
        cg_iters: int = 10,
        cg_tol: float = 1e-6,
    ) -> None:
        if lr <= 0 or damping < 0 or cg_iters < 1:
            raise SpecdefError(
                f"ggn-cg needs lr > 0, damping >= 0, cg_iters >= 1; found lr={lr}, "
                f"damping={damping}, cg_iters={cg_iters}."
            )
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, model)
        self.damping, self.cg_iters, self.cg_tol = damping, cg_iters, cg_tol

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        # curvlinops: exact GGN-vector products, imported lazily (≈0.3 s)
        from curvlinops import GGNLinearOperator

        loss, grads = self._gradient(closure)
        loss_func = nn.MSELoss() if _is_mse(self._data) else nn.CrossEntropyLoss()
        ggn = GGNLinearOperator(
            self.model, loss_func, self._params(), self._data, check_deterministic=False
        )
        shift = self.damping + self.param_groups[0]["weight_decay"]

        def matvec(vec: list[torch.Tensor], last: bool) -> list[torch.Tensor]:
            return [gv + shift * v for gv, v in zip(ggn @ vec, vec, strict=True)]

        self._apply(truncated_cg(matvec, grads, iters=self.cg_iters, tol=self.cg_tol))
        return loss

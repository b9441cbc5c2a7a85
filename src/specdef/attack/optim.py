"""Optimizer registry. Each entry builds a real optimizer (``torch.optim``, ``pytorch_optimizer``)
and declares what the training loop must do for it, so the loop reads flags, never names:

- ``needs_create_graph``: call ``loss.backward(create_graph=True)`` (Hutchinson / Hessian-vector
  products inside ``step``);
- ``needs_closure``: call ``optimizer.step(closure)``; the closure zeroes gradients, runs forward and
  backward on the step's batches and returns the loss;
- ``second_order``: uses curvature (informational; reported with results);
- ``splits_matrices``: hidden 2-D weights go to one inner optimizer, the rest to another;
- ``needs_model``: built with ``model=`` (K-FAC, GGN-CG and SPSA run the model themselves);
- ``needs_batch``: before each ``step`` the loop calls ``optimizer.observe(task, micro_batches)``
  (:class:`specdef.attack.natural.BatchAware`), for curvature or loss values on the step's data;
- ``search_space``: the optimizer's own hyperparameters a worst-case attacker searches
  (``specdef.attack.search``), by keyword name; ``"betas.0"`` is element 0 of the ``betas`` tuple.

:func:`make_optimizer` returns the optimizer and its entry. Every optimizer exposes
``param_groups`` (each group keeps its ``initial_lr``, which learning-rate schedules scale),
``step(closure=None)`` and ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from specdef.attack.natural import KFAC, GaussNewtonCG, truncated_cg
from specdef.attack.stochastic import SGLD, SPSA
from specdef.errors import SpecdefError, did_you_mean

NamedParams = list[tuple[str, nn.Parameter]]


class OptimizerLike(Protocol):
    """What the attack loop needs from an optimizer (``torch.optim.Optimizer`` satisfies it)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def step(self, closure: Callable[[], Any] | None = None) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


SEARCH_KINDS = ("log", "float", "int", "choice")


@dataclass(frozen=True)
class SearchParam:
    """One searched hyperparameter: ``"log"`` (log-uniform on [low, high]), ``"float"`` (uniform),
    ``"int"`` (integers in [low, high]) or ``"choice"`` (one of ``choices``: None/bool/int/float/
    str, what a search storage can hold)."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SEARCH_KINDS:
            raise SpecdefError(f"Search kind must be one of {SEARCH_KINDS}; found {self.kind!r}.")
        if self.kind == "choice":
            if not self.choices:
                raise SpecdefError("A 'choice' search parameter needs at least one choice.")
        elif not self.low <= self.high or (self.kind == "log" and self.low <= 0):
            raise SpecdefError(
                f"Search range must have low <= high (and low > 0 for 'log'); found "
                f"[{self.low}, {self.high}] for {self.kind!r}."
            )


def log_uniform(low: float, high: float) -> SearchParam:
    return SearchParam("log", low, high)


def uniform(low: float, high: float) -> SearchParam:
    return SearchParam("float", low, high)


def integers(low: int, high: int) -> SearchParam:
    return SearchParam("int", low, high)


def choice(*options: Any) -> SearchParam:
    return SearchParam("choice", choices=tuple(options))


def assemble_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """Optimizer keywords from searched values: ``{"betas.0": .9, "betas.1": .99}`` →
    ``{"betas": (.9, .99)}`` (indices must run 0..n-1); other keys pass through."""
    out: dict[str, Any] = {}
    parts: dict[str, dict[int, Any]] = {}
    for key, value in values.items():
        name, dot, index = key.partition(".")
        if dot and index.isdigit():
            parts.setdefault(name, {})[int(index)] = value
        else:
            out[key] = value
    for name, items in parts.items():
        if sorted(items) != list(range(len(items))):
            raise SpecdefError(
                f"Searched elements of {name!r} must be numbered 0..{len(items) - 1}; found "
                f"{sorted(items)}."
            )
        out[name] = tuple(items[i] for i in range(len(items)))
    return out


_ADAM_SPACE = {
    "betas.0": uniform(0.5, 0.99),
    "betas.1": choice(0.9, 0.95, 0.99, 0.999),
    "eps": log_uniform(1e-12, 1e-4),
}
_MOMENTUM_SPACE = {"momentum": uniform(0.5, 0.99)}


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer: how to build it and what the loop must do for it."""

    name: str
    build: Callable[..., OptimizerLike]  # (params, *, lr, weight_decay, **kwargs)
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_create_graph: bool = False
    needs_closure: bool = False
    second_order: bool = False
    splits_matrices: bool = False
    needs_model: bool = False
    needs_batch: bool = False
    search_space: Mapping[str, SearchParam] = field(default_factory=dict)


class CompositeOptimizer:
    """Several optimizers over disjoint parameter sets, stepped together as one object."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for opt, sub in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sub)


class NewtonCG(torch.optim.Optimizer):
    """Damped Newton step by truncated conjugate gradient, for small models.

    Solves ``(H + damping·I) d = g`` with at most ``cg_iters`` CG iterations, where ``H·v`` is a
    Hessian-vector product by double backward through the gradients the closure leaves in
    ``p.grad`` (it must call ``backward(create_graph=True)``). CG stops early on negative or zero
    curvature (the direction found so far is kept; on the first iteration it is ``g`` itself),
    then ``p ← p − lr·d``. All parameters are treated as one block.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        damping: float = 1.0,
        cg_iters: int = 10,
        cg_tol: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or damping < 0 or cg_iters < 1:
            raise SpecdefError(
                f"newton-cg needs lr > 0, damping >= 0, cg_iters >= 1; found lr={lr}, "
                f"damping={damping}, cg_iters={cg_iters}."
            )
        defaults = {"lr": lr, "damping": damping, "cg_iters": cg_iters, "cg_tol": cg_tol}
        defaults["weight_decay"] = weight_decay
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise SpecdefError("newton-cg needs a closure; call optimizer.step(closure).")
        with torch.enable_grad():
            loss = closure()
        group = self.param_groups[0]
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        grads = [p.grad for p in params]
        if any(g is None or not g.requires_grad for g in grads):
            raise SpecdefError(
                "newton-cg found gradients without a graph; the closure must call "
                "backward(create_graph=True)."
            )
        wd, damping = group["weight_decay"], group["damping"]
        rhs = [g.detach() + wd * p for g, p in zip(grads, params, strict=True) if g is not None]

        def hvp(vec: list[torch.Tensor], last: bool) -> list[torch.Tensor]:
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    [g for g in grads if g is not None],
                    params,
                    grad_outputs=vec,
                    retain_graph=not last,
                    allow_unused=True,
                )
            return [
                (h if h is not None else torch.zeros_like(v)) + (damping + wd) * v
                for h, v in zip(hv, vec, strict=True)
            ]

        direction = truncated_cg(hvp, rhs, iters=group["cg_iters"], tol=group["cg_tol"])
        for p, d in zip(params, direction, strict=True):
            p.add_(d, alpha=-group["lr"])
        return loss


def _torch(cls: Any, **fixed: Any) -> Callable[..., OptimizerLike]:
    def build(params: NamedParams, *, lr: float, weight_decay: float, **kwargs: Any) -> Any:
        return cls([p for _, p in params], lr=lr, weight_decay=weight_decay, **{**fixed, **kwargs})

    return build


def _pytorch_optimizer(class_name: str) -> Callable[..., OptimizerLike]:
    def build(params: NamedParams, *, lr: float, weight_decay: float, **kwargs: Any) -> Any:
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, class_name)
        return cls([p for _, p in params], lr=lr, weight_decay=weight_decay, **kwargs)

    return build


def _muon(
    params: NamedParams,
    *,
    lr: float,
    weight_decay: float,
    matrices: frozenset[str] = frozenset(),
    adamw_lr: float | None = None,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    **kwargs: Any,
) -> CompositeOptimizer:
    hidden = [p for n, p in params if n in matrices]
    rest = [p for n, p in params if n not in matrices]
    inner: list[torch.optim.Optimizer] = []
    if hidden:
        inner.append(torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, **kwargs))
    if rest:
        inner.append(
            torch.optim.AdamW(
                rest, lr=adamw_lr if adamw_lr is not None else lr, betas=adamw_betas,
                weight_decay=weight_decay,
            )
        )  # fmt: skip
    return CompositeOptimizer(inner)


def _newton_cg(params: NamedParams, *, lr: float, weight_decay: float, **kwargs: Any) -> NewtonCG:
    return NewtonCG([p for _, p in params], lr=lr, weight_decay=weight_decay, **kwargs)


def _with_params(cls: Any, **fixed: Any) -> Callable[..., OptimizerLike]:
    """A builder for specdef's own optimizer classes (keyword ``lr``, ``weight_decay``, …)."""

    def build(params: NamedParams, *, lr: float, weight_decay: float, **kwargs: Any) -> Any:
        return cls([p for _, p in params], lr=lr, weight_decay=weight_decay, **{**fixed, **kwargs})

    return build


_KFAC_SPACE = {
    # relative to each factor's mean eigenvalue; down to 1e-12, where K-FAC is invariant to the
    # reparameterization (docs/theory.md), and up to 1, where it is close to scaled SGD
    "damping": log_uniform(1e-12, 1.0),
    "damping_floor": log_uniform(1e-12, 1.0),  # absolute: G ≈ 0 on a confidently wrong model
    "refresh": choice(1, 5, 20),
}

OPTIMIZERS: dict[str, OptimizerEntry] = {
    e.name: e
    for e in (
        OptimizerEntry("sgd", _torch(torch.optim.SGD), "plain SGD (torch.optim.SGD)"),
        OptimizerEntry(
            "sgd-momentum",
            _torch(torch.optim.SGD, momentum=0.9),
            "SGD with heavy-ball momentum 0.9",
            search_space=_MOMENTUM_SPACE,
        ),
        OptimizerEntry(
            "nesterov",
            _torch(torch.optim.SGD, momentum=0.9, nesterov=True),
            "SGD with Nesterov momentum 0.9",
            search_space=_MOMENTUM_SPACE,
        ),
        OptimizerEntry(
            "adam", _torch(torch.optim.Adam), "Adam (L2 weight decay)", search_space=_ADAM_SPACE
        ),
        OptimizerEntry(
            "adamw",
            _torch(torch.optim.AdamW),
            "AdamW (decoupled weight decay)",
            search_space=_ADAM_SPACE,
        ),
        OptimizerEntry(
            "adagrad",
            _torch(torch.optim.Adagrad),
            "Adagrad",
            search_space={
                "eps": log_uniform(1e-12, 1e-4),
                "initial_accumulator_value": choice(0.0, 0.1),
            },
        ),
        OptimizerEntry(
            "rmsprop",
            _torch(torch.optim.RMSprop),
            "RMSprop",
            search_space={
                "alpha": uniform(0.9, 0.999),
                "momentum": choice(0.0, 0.5, 0.9),
                "eps": log_uniform(1e-12, 1e-4),
            },
        ),
        OptimizerEntry(
            "muon",
            _muon,
            "torch.optim.Muon on hidden 2-D weights + AdamW on the rest",
            splits_matrices=True,
            search_space={
                "momentum": uniform(0.8, 0.99),
                "nesterov": choice(True, False),
                "adjust_lr_fn": choice("original", "match_rms_adamw"),
                # the AdamW half (biases, output layer) gets its own rate, searched as widely
                "adamw_lr": log_uniform(1e-12, 1.0),
            },
        ),
        OptimizerEntry(
            "adahessian",
            _pytorch_optimizer("AdaHessian"),
            "AdaHessian (pytorch_optimizer), Hutchinson Hessian diagonal every step",
            needs_create_graph=True,
            second_order=True,
            search_space={
                "betas.0": uniform(0.5, 0.99),
                "betas.1": choice(0.99, 0.999),
                "hessian_power": uniform(0.5, 1.0),
            },
        ),
        OptimizerEntry(
            "sophiah",
            _pytorch_optimizer("SophiaH"),
            "SophiaH (pytorch_optimizer), clipped Hutchinson-preconditioned steps",
            needs_create_graph=True,
            second_order=True,
            search_space={
                "betas.0": uniform(0.5, 0.99),
                "betas.1": choice(0.99, 0.999),
                "p": log_uniform(1e-3, 1e-1),
            },
        ),
        OptimizerEntry(
            "newton-cg",
            _newton_cg,
            "damped Newton step by truncated CG on Hessian-vector products (small models)",
            defaults={"damping": 1.0, "cg_iters": 10},
            needs_create_graph=True,
            needs_closure=True,
            second_order=True,
            search_space={"damping": log_uniform(1e-4, 10.0), "cg_iters": integers(2, 20)},
        ),
        OptimizerEntry(
            "kfac",
            _with_params(KFAC, kind="kfac"),
            "K-FAC natural gradient on curvlinops' KFAC operator and inverse (float64 retry)",
            defaults={"damping": 1e-3, "damping_floor": 1e-3, "refresh": 1},
            needs_closure=True,
            second_order=True,
            needs_model=True,
            needs_batch=True,
            search_space={**_KFAC_SPACE, "fisher_type": choice("type-2", "mc", "empirical")},
        ),
        OptimizerEntry(
            "ekfac",
            _with_params(KFAC, kind="ekfac"),
            "EKFAC natural gradient (curvlinops' eigenvalue-corrected KFAC, exact damping)",
            defaults={"damping": 1e-3, "damping_floor": 1e-3, "refresh": 1},
            needs_closure=True,
            second_order=True,
            needs_model=True,
            needs_batch=True,
            search_space=_KFAC_SPACE,
        ),
        OptimizerEntry(
            "ggn-cg",
            _with_params(GaussNewtonCG),
            "Gauss-Newton-CG: (GGN + damping·I) d = g by truncated CG on curvlinops' GGN products",
            defaults={"damping": 1e-2, "cg_iters": 10},
            needs_closure=True,
            second_order=True,
            needs_model=True,
            needs_batch=True,
            search_space={"damping": log_uniform(1e-8, 10.0), "cg_iters": integers(2, 20)},
        ),
        OptimizerEntry(
            "shampoo",
            _pytorch_optimizer("Shampoo"),
            "Shampoo (pytorch_optimizer): full-matrix Kronecker preconditioner per weight",
            search_space={
                "momentum": choice(0.0, 0.5, 0.9),
                "matrix_eps": log_uniform(1e-12, 1e-2),
                "preconditioning_compute_steps": choice(1, 10),
            },
        ),
        OptimizerEntry(
            "soap",
            _pytorch_optimizer("SOAP"),
            "SOAP (pytorch_optimizer): Adam in Shampoo's eigenbasis",
            search_space={
                "betas.0": uniform(0.5, 0.99),
                "betas.1": choice(0.9, 0.95, 0.99),
                "precondition_frequency": choice(1, 10, 50),
                "eps": log_uniform(1e-12, 1e-4),
            },
        ),
        OptimizerEntry(
            "kron",
            _pytorch_optimizer("Kron"),
            "Kron / PSGD (pytorch_optimizer): Kronecker-factored preconditioner fitted by PSGD",
            search_space={
                "momentum": uniform(0.5, 0.99),
                "pre_conditioner_update_probability": choice(None, 0.1, 1.0),
            },
        ),
        OptimizerEntry(
            "lion",
            _pytorch_optimizer("Lion"),
            "Lion (pytorch_optimizer): sign of an interpolated momentum",
            search_space={"betas.0": uniform(0.5, 0.99), "betas.1": choice(0.9, 0.99, 0.999)},
        ),
        OptimizerEntry(
            "signsgd",
            _pytorch_optimizer("SignSGD"),
            "SignSGD with momentum (pytorch_optimizer)",
            search_space={"momentum": choice(0.0, 0.5, 0.9, 0.99)},
        ),
        OptimizerEntry(
            "spsa",
            _with_params(SPSA),
            "zeroth-order SPSA / MeZO: two loss values per random direction, no gradients",
            defaults={"eps": 1e-3, "perturbations": 1},
            needs_closure=True,
            needs_model=True,
            needs_batch=True,
            search_space={"eps": log_uniform(1e-5, 1e-1), "perturbations": choice(1, 4, 16)},
        ),
        OptimizerEntry(
            "sgld",
            _with_params(SGLD),
            "SGLD: gradient step plus Gaussian noise·√(2·lr)",
            defaults={"noise": 1e-3},
            search_space={"noise": log_uniform(1e-6, 1.0)},
        ),
    )
}


def get_optimizer_entry(name: str) -> OptimizerEntry:
    """The registry entry for ``name``; unknown names raise with a "did you mean"."""
    if name not in OPTIMIZERS:
        raise SpecdefError(did_you_mean(name, OPTIMIZERS, what="optimizer"))
    return OPTIMIZERS[name]


def hidden_matrices(model: nn.Module, params: NamedParams) -> frozenset[str]:
    """Names of 2-D weights of ``nn.Linear`` layers, except a model's output embedding (a head
    tied to or acting as an embedding), which Muon's authors leave to AdamW with all 1-D tensors."""
    linear_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not None
    }
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    excluded = {id(out.weight)} if isinstance(out, nn.Module) and hasattr(out, "weight") else set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return frozenset(
        n
        for n, p in params
        if p.ndim == 2 and id(p) in linear_weights and id(p) not in excluded | embeddings
    )


def make_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    kwargs: Mapping[str, Any] | None = None,
) -> tuple[OptimizerLike, OptimizerEntry]:
    """Build optimizer ``name`` over the trainable parameters of ``model``.

    ``kwargs`` override the entry's defaults (e.g. ``{"betas": (0.9, 0.99)}``, or for newton-cg
    ``{"damping": 1e-3, "cg_iters": 20}``). Each parameter group records ``initial_lr``.
    """
    entry = get_optimizer_entry(name)
    params: NamedParams = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise SpecdefError(
            "No trainable parameters: expected at least one with requires_grad; check --train / "
            "--lora targets."
        )
    extra: dict[str, Any] = {**entry.defaults, **(kwargs or {})}
    if entry.splits_matrices:
        extra["matrices"] = hidden_matrices(model, params)
    if entry.needs_model:
        extra["model"] = model
    try:
        optimizer = entry.build(params, lr=lr, weight_decay=weight_decay, **extra)
    except TypeError as err:
        raise SpecdefError(
            f"Bad keyword arguments for optimizer {name!r}: {err}; expected those of "
            f"{entry.description}."
        ) from None
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer, entry

"""Hessian-vector products of ``L(θ) = mean_b loss_fn(model, batch_b)`` by double backward, and the
Hessian (or one of its blocks) as a linear operator.

A *block* is a set of parameters: ``None`` (all trainable parameters), a list of parameter names,
or a predicate ``(name, parameter) -> bool``. ``HessianOperator(rows=R, columns=C)`` is the block
``H[R, C]`` (``∂²L/∂θ_R∂θ_C``); with ``columns`` omitted it is the symmetric diagonal block
``H[R, R]``, which by Cauchy interlacing (Poincaré separation) satisfies
``λ_min(H) ≤ λ(H[R, R]) ≤ λ_max(H)``, and any block satisfies ``σ₁(H[R, C]) ≤ σ₁(H)``.

Products are computed in the parameters' dtype, in ``eval()`` mode (dropout off, so the operator is
deterministic), over every batch, each batch weighted ``1/len(batches)``. Attention kernels without
a double backward on CPU are avoided automatically (:func:`double_backward_safe`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from specdef.errors import SpecdefError, did_you_mean

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar`` (e.g. :meth:`specdef.tasks.Task.loss`)."""

ParamSpec = None | Sequence[str] | Callable[[str, nn.Parameter], bool]


def select_parameters(model: nn.Module, block: ParamSpec = None) -> list[tuple[str, nn.Parameter]]:
    """``[(name, parameter)]`` of ``block`` in module order (tied parameters appear once)."""
    named = list(model.named_parameters())
    if block is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(block):
        chosen = [(n, p) for n, p in named if block(n, p)]
    else:
        if isinstance(block, str):
            raise SpecdefError(
                f"Expected a list of parameter names, found the string {block!r}; wrap it: [name]."
            )
        by_name = dict(named)
        missing = [n for n in block if n not in by_name]
        if missing:
            raise SpecdefError(did_you_mean(missing[0], by_name, what="parameter"))
        wanted = set(block)
        chosen = [(n, p) for n, p in named if n in wanted]
    if not chosen:
        raise SpecdefError(
            "The parameter block is empty: no parameter matched; check the names or the predicate."
        )
    return chosen


@contextlib.contextmanager
def double_backward_safe(model: nn.Module) -> Iterator[None]:
    """Run the block with attention kernels that support double backward, then restore.

    PyTorch's fused CPU attention (flash / memory-efficient SDPA) has no second derivative, so
    SDPA is restricted to the math kernel, and Hugging Face configs that ask for another kernel
    (``flash_attention_*``, ``flex_attention``, …) are switched to ``"eager"`` for the duration.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    changed: list[tuple[Any, str]] = []
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        impl = getattr(config, "_attn_implementation", None)
        if isinstance(impl, str) and impl not in ("eager", "sdpa"):
            changed.append((config, impl))
            config._attn_implementation = "eager"
    if changed:
        log.info("using eager attention for double backward (was %s)", changed[0][1])
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for config, impl in changed:
            config._attn_implementation = impl


@contextlib.contextmanager
def hessian_mode(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` only on ``params`` (cheaper backward), restored afterwards."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        with double_backward_safe(model), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class HessianOperator:
    """The Hessian block ``H[rows, columns]`` of the mean loss over ``batches``, matrix-free.

    ``op @ v`` takes a flat vector (length ``op.shape[1]``, the columns' parameters concatenated in
    module order) or a matrix of such columns; ``op.rmatvec`` applies ``H[columns, rows]``.
    ``op.hvps`` counts Hessian-vector products (one per vector, each over all batches).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        rows: ParamSpec = None,
        columns: ParamSpec = None,
    ) -> None:
        if len(batches) == 0:
            raise SpecdefError("No batches given for the Hessian; pass at least one batch.")
        self.model, self.loss_fn, self.batches = model, loss_fn, list(batches)
        self.rows = select_parameters(model, rows)
        self.columns = self.rows if columns is None else select_parameters(model, columns)
        self.symmetric = columns is None or [n for n, _ in self.rows] == [
            n for n, _ in self.columns
        ]
        self.shape = (
            sum(p.numel() for _, p in self.rows),
            sum(p.numel() for _, p in self.columns),
        )
        first = self.rows[0][1]
        self.dtype, self.device = first.dtype, first.device
        self.hvps = 0

    @property
    def row_names(self) -> list[str]:
        return [n for n, _ in self.rows]

    @property
    def column_names(self) -> list[str]:
        return [n for n, _ in self.columns]

    def _product(
        self,
        vector: torch.Tensor,
        out_params: list[tuple[str, nn.Parameter]],
        in_params: list[tuple[str, nn.Parameter]],
    ) -> torch.Tensor:
        outs = [p for _, p in out_params]
        ins = [p for _, p in in_params]
        union = list({id(p): p for p in [*ins, *outs]}.values())
        flat = torch.split(vector.to(self.dtype), [p.numel() for p in ins])
        pieces = [v.view_as(p).to(p.device) for v, p in zip(flat, ins, strict=True)]
        total = [torch.zeros_like(p) for p in outs]
        scale = 1.0 / len(self.batches)
        with hessian_mode(self.model, union):
            for batch in self.batches:
                loss = self.loss_fn(self.model, batch)
                grads = torch.autograd.grad(loss, ins, create_graph=True, allow_unused=True)
                dot = torch.zeros((), dtype=loss.dtype, device=loss.device)
                for g, v in zip(grads, pieces, strict=True):
                    if g is not None:
                        dot = dot + (g * v).sum()
                if not dot.requires_grad:
                    continue  # the gradient does not depend on these parameters: H v = 0
                second = torch.autograd.grad(dot, outs, allow_unused=True)
                for acc, s in zip(total, second, strict=True):
                    if s is not None:
                        acc.add_(s.detach(), alpha=scale)
        self.hvps += 1
        return torch.cat([t.reshape(-1) for t in total]).to(vector.device)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H[rows, columns] @ vector`` (flat, length ``shape[1]``)."""
        self._check(vector, self.shape[1])
        return self._product(vector, self.rows, self.columns)

    def rmatvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H[columns, rows] @ vector`` = ``H[rows, columns]ᵀ @ vector`` (flat, ``shape[0]``)."""
        self._check(vector, self.shape[0])
        if self.symmetric:
            return self._product(vector, self.rows, self.columns)
        return self._product(vector, self.columns, self.rows)

    def _check(self, vector: torch.Tensor, size: int) -> None:
        if vector.dim() != 1 or vector.shape[0] != size:
            raise SpecdefError(
                f"Expected a flat vector of length {size} for this Hessian block, found shape "
                f"{tuple(vector.shape)}."
            )

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        if other.dim() == 1:
            return self.matvec(other)
        return torch.stack([self.matvec(col) for col in other.T], dim=1)

    def parameters_vector(self) -> torch.Tensor:
        """The current values of the row parameters, flattened (detached copy)."""
        return torch.cat([p.detach().reshape(-1) for _, p in self.rows])

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` view (float64 NumPy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=self.dtype)
            return self.matvec(v).detach().cpu().double().numpy()

        def rmv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=self.dtype)
            return self.rmatvec(v).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=rmv, dtype=np.float64)


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    vector: torch.Tensor,
    *,
    block: ParamSpec = None,
) -> torch.Tensor:
    """One product ``H[block, block] @ vector`` (flat vector over the block's parameters)."""
    return HessianOperator(model, loss_fn, batches, rows=block).matvec(vector)

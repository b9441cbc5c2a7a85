"""Zero-overhead *native* deformation: inflate along the exact linear symmetries a network already
has, so the defended model keeps its architecture, its parameter count and its speed, and loads with
stock ``transformers`` (no compensation layer, no specdef import, no remote code).

Symmetries used (each leaves the function exactly unchanged in exact arithmetic):

- **attention V/O, per key-value head** ``h``: ``V_h → M_h·V_h`` (and its bias ``b_h → M_h·b_h``),
  and for every query head ``q`` reading that KV head, ``O_q → O_q·M_h⁻¹``. Attention mixes tokens
  with scalar weights shared by all head-dim coordinates, so ``O_q·M⁻¹·Σ_t a_t·M·v_t = O_q·Σ_t a_t·v_t``.
  With ``M_h = I + (α−1)·U_kU_kᵀ`` on the top-k left singular subspace of ``V_h`` (from
  :func:`specdef.linalg.spectral.top_subspace`), V_h's top-k singular values are multiplied by α.
  Llama-family (incl. grouped-query attention, where the query heads of a group share ``M_h``),
  GPT-2 (the V third of ``c_attn`` and ``c_proj``), BERT (``value`` and ``output.dense``).
- **gated MLP** ``down(act(gate·x) ⊙ up·x)``: ``up → D·up``, ``down → down·D⁻¹`` for a diagonal
  ``D`` (the elementwise product allows nothing else); ``D = α`` on the ``top_k`` rows of ``up`` with
  the largest norms, 1 elsewhere.
- **ReLU MLP** ``W₂·relu(W₁x + b₁)``: ``(W₁, b₁) → D·(W₁, b₁)``, ``W₂ → W₂·D⁻¹`` with ``D > 0``
  (ReLU is positively homogeneous); same choice of ``D``.

The tensor math is in :mod:`specdef.linalg.symmetry` (shared with :mod:`specdef.streaming.native`), finding the
symmetric pairs in a model and moving their tensors in :mod:`specdef.native.pairs`; this module applies the deformation and provides the informed attacker's side:
:func:`rebalance_` (undo any such deformation without extra parameters) and
:func:`native_imbalance` (detection without the original model).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from specdef.defense.config import SpecDefConfig
from specdef.defense.step import layer_generator
from specdef.errors import SpecdefError
from specdef.linalg import symmetry as sym
from specdef.native.pairs import (
    SymmetricPair,
    pair_dtype,
    read_pair,
    select_pairs,
    write_pair,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairRecord:
    """What happened to one pair: the largest singular value of the inflated side before/after,
    the relative error of the pair's product in the stored dtype, the tolerance it was held to,
    and the imbalance score."""

    pair: str
    kind: str
    sigma_max_before: float
    sigma_max_after: float
    product_error: float
    tolerance: float
    imbalance_log10: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def over_tolerance(self) -> bool:
        return self.product_error > self.tolerance


def apply_native_(model: nn.Module, config: SpecDefConfig) -> list[PairRecord]:
    """Deform ``model`` in place along its native symmetries; the function is unchanged.

    ``config.top_k`` is the number of singular directions (attention: per KV head, at most
    ``head_dim``) or diagonal entries (MLP: rows of the inflated side) multiplied by
    ``config.alpha``; ``config.targets``/``exclude`` select pairs as in
    :func:`specdef.native.pairs.select_pairs` (``"all-linear"``: every pair). Computation in
    float64, cast back to each parameter's dtype. Each pair's random sketch (``method=
    "randomized"``) is drawn from :func:`specdef.defense.step.layer_generator` of the pair's name,
    as in streaming. The precision guard measures, in that dtype, the relative error of each
    pair's product (O_q·V_h per query head, down·up, W₂·W₁) and refuses above
    ``config.tolerance_for(dtype)`` (the table Algorithm 1 uses) unless ``config.force``; a refusal
    leaves ``model`` unchanged. Returns one :class:`PairRecord` per deformed pair.
    """
    check_native_config(config)
    pairs = select_pairs(model, config.targets, exclude=config.exclude)
    # pairs can share a module (W₂ compensates pair 1 and is inflated in pair 2): apply in order,
    # each reading the current weights, and roll every change back if a later pair fails the guard
    backup = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(n.startswith(m + ".") for pair in pairs for m in (pair.inflated, pair.compensating))
    }
    records: list[PairRecord] = []
    try:
        for pair in pairs:
            before = read_pair(model, pair)
            after = sym.deform_pair(
                pair.kind,
                before,
                alpha=config.alpha,
                top_k=config.top_k,
                heads=pair.heads,
                kv_heads=pair.kv_heads,
                method=config.method,
                generator=layer_generator(config.seed, pair.name),
                name=pair.inflated,
            )
            record = pair_record(pair, before, after, pair_dtype(model, pair), config)
            check_pair(record, pair_dtype(model, pair), config)
            write_pair(model, pair, after)
            records.append(record)
    except BaseException:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, value in backup.items():
                params[n].copy_(value)
        raise
    return records


def check_native_config(config: SpecDefConfig) -> None:
    """Refuse what native mode cannot honour (in memory and streaming alike)."""
    if config.n_random is not None:
        raise SpecdefError(
            f"native mode defends every selected pair; n_random={config.n_random} applies to "
            "Algorithm 1 only — select pairs with targets/exclude instead."
        )


def pair_record(
    pair: SymmetricPair,
    before: sym.PairTensors,
    after: sym.PairTensors,
    dtype: torch.dtype,
    config: SpecDefConfig,
) -> PairRecord:
    """The record of one pair (in memory and streaming): ``before``/``after`` in Linear layout,
    float64; the product error is measured with ``after`` rounded to ``dtype`` (what is stored),
    σ_max and the imbalance on the float64 tensors."""
    rounded = sym.PairTensors(
        after.inflated.to(dtype),
        None if after.bias is None else after.bias.to(dtype),
        after.compensating.to(dtype),
    )
    return PairRecord(
        pair=pair.name,
        kind=pair.kind,
        sigma_max_before=sym.sigma_max(before.inflated),
        sigma_max_after=sym.sigma_max(after.inflated),
        product_error=sym.product_error(
            pair.kind, before, rounded, heads=pair.heads, kv_heads=pair.kv_heads
        ),
        tolerance=config.tolerance_for(dtype),
        imbalance_log10=sym.imbalance(pair.kind, after, heads=pair.heads, kv_heads=pair.kv_heads),
    )


def check_pair(record: PairRecord, dtype: torch.dtype, config: SpecDefConfig) -> None:
    """The native precision guard: refuse a pair whose product error exceeds its tolerance,
    unless ``config.force``."""
    if record.over_tolerance and not config.force:
        short = str(dtype).removeprefix("torch.")
        raise SpecdefError(
            f"{record.pair}: the {short} weights reproduce the pair's product with relative "
            f"error {record.product_error:.2e} > tolerance {record.tolerance:.3g} at "
            f"alpha={config.alpha:g}; lower --alpha, store in a wider dtype, raise --tolerance, "
            "or pass --force."
        )


def native_imbalance(
    model: nn.Module, *, targets: Sequence[str] | str | None = None
) -> dict[str, float]:
    """Detection without the original model: for each symmetric pair, log10 of the largest factor
    by which the balancing transform (see :func:`rebalance_`) would rescale it
    (:func:`joint_imbalance`). A pair deformed natively with α scores ≈ log10(α); an undeformed pair
    scores what its training left (≤ 0.53 on the models measured for
    ``specdef.informed.detect.DetectConfig.native_threshold``)."""
    pairs = select_pairs(model, targets)
    return joint_imbalance(pairs, {p.name: read_pair(model, p) for p in pairs})


def _row_norms(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)
    return torch.linalg.vector_norm(rows, dim=1)


def joint_imbalance(
    pairs: Sequence[SymmetricPair],
    tensors: Mapping[str, sym.PairTensors],
    *,
    tol: float = 1e-6,
    max_sweeps: int = 200,
) -> dict[str, float]:
    """Per pair, log10 of the largest factor the *joint* balancing of all ``pairs`` applies to it:
    the product over the sweeps :func:`rebalance_` runs. ``tensors[pair.name]`` is the pair as
    stored (:func:`read_pair` / :func:`stored_pair`).

    For pairs that share no layer this is one sweep, :func:`specdef.linalg.symmetry.imbalance`. Along a
    chain of ReLU pairs (``W₁ → W₂ → W₃``, ``W₂`` in both) a deformation of one pair also unbalances
    its neighbour (scaling W₂'s rows changes its column norms); the balanced point is unique, so
    the joint factors attribute each deformation to the pair whose hidden units it scaled.
    """
    members = [m for p in pairs for m in (p.inflated, p.compensating)]
    shared = {m for m in members if members.count(m) > 1}
    chain = [p for p in pairs if {p.inflated, p.compensating} & shared and p.kind != "attention"]
    scores = {
        p.name: sym.imbalance(p.kind, tensors[p.name], heads=p.heads, kv_heads=p.kv_heads)
        for p in pairs
        if p not in chain
    }
    store: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for p in chain:  # a shared layer is the compensating side of one pair, inflated in the next
        t = tensors[p.name]
        store[p.inflated] = (t.inflated, t.bias)
        store.setdefault(p.compensating, (t.compensating, None))
    logs = {
        p.name: torch.zeros(tensors[p.name].inflated.shape[0], dtype=torch.float64) for p in chain
    }
    for _ in range(max_sweeps if chain else 0):
        worst = 0.0
        for p in chain:
            (w, b), (o, o_bias) = store[p.inflated], store[p.compensating]
            new = sym.balance_pair(p.kind, sym.PairTensors(w, b, o))
            rows, scaled = _row_norms(w, b), _row_norms(new.inflated, new.bias)
            step = torch.where(rows > 0, scaled / torch.where(rows > 0, rows, 1.0), 1.0).log10()
            logs[p.name] += step
            worst = max(worst, float(step.abs().max()))
            store[p.inflated], store[p.compensating] = (
                (new.inflated, new.bias),
                (new.compensating, o_bias),
            )
        if worst <= tol:
            break
    scores.update({name: float(v.abs().max()) for name, v in logs.items()})
    return {p.name: scores[p.name] for p in pairs}


def rebalance_(
    model: nn.Module,
    *,
    targets: Sequence[str] | str | None = None,
    tol: float = 1e-6,
    max_sweeps: int = 200,
) -> dict[str, tuple[float, float]]:
    """The informed attacker's undo: move every symmetric pair to its *balanced* representative,
    with no extra parameters and the function unchanged.

    Attention: per KV head, ``M = P^{1/2}`` with ``P`` the geometric mean solving ``P·A·P = B``
    (``A = [V_h b_h][V_h b_h]ᵀ``, ``B = Σ_q O_qᵀO_q``), so that ``M·V`` and ``O·M⁻¹`` have equal Gram
    matrices. Diagonal pairs: ``d_i = sqrt(‖column i of the compensating side‖ / ‖row i of the
    inflated side‖)``. For disjoint pairs (every transformers model) one sweep is exact and the
    balanced form is the same whatever deformation was applied before (unique up to an orthogonal
    factor). Pairs that share a layer (the middle layers of a deep ReLU MLP) disturb each other's
    balance, so sweeps repeat (alternating scaling, as in Sinkhorn's matrix balancing) until every
    pair's imbalance is below ``tol`` (log10 units) or ``max_sweeps``. Returns ``{pair: (imbalance
    before, imbalance after)}`` (before: :func:`joint_imbalance`).
    """
    pairs = select_pairs(model, targets)

    def scores() -> dict[str, float]:
        return {
            p.name: sym.imbalance(p.kind, read_pair(model, p), heads=p.heads, kv_heads=p.kv_heads)
            for p in pairs
        }

    before = joint_imbalance(pairs, {p.name: read_pair(model, p) for p in pairs})
    after = before
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        for pair in pairs:
            tensors = read_pair(model, pair)
            balanced = sym.balance_pair(
                pair.kind, tensors, heads=pair.heads, kv_heads=pair.kv_heads
            )
            write_pair(model, pair, balanced)
        after = scores()
        if max(after.values()) <= tol:
            break
    if max(after.values()) > tol:
        log.warning("rebalance: imbalance %.2e after %d sweeps", max(after.values()), sweeps)
    log.info("rebalance: %d pairs in %d sweep(s)", len(pairs), sweeps)
    return {name: (before[name], after[name]) for name in before}

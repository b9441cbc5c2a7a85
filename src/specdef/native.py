"""Zero-overhead *native* deformation: inflate along the exact linear symmetries a network already
has, so the defended model keeps its architecture, its parameter count and its speed, and loads with
stock ``transformers`` (no compensation layer, no specdef import, no remote code).

Symmetries used (each leaves the function exactly unchanged in exact arithmetic):

- **attention V/O, per key-value head** ``h``: ``V_h → M_h·V_h`` (and its bias ``b_h → M_h·b_h``),
  and for every query head ``q`` reading that KV head, ``O_q → O_q·M_h⁻¹``. Attention mixes tokens
  with scalar weights shared by all head-dim coordinates, so ``O_q·M⁻¹·Σ_t a_t·M·v_t = O_q·Σ_t a_t·v_t``.
  With ``M_h = I + (α−1)·U_kU_kᵀ`` on the top-k left singular subspace of ``V_h`` (from
  :func:`specdef.spectral.top_subspace`), V_h's top-k singular values are multiplied by α.
  Llama-family (incl. grouped-query attention, where the query heads of a group share ``M_h``),
  GPT-2 (the V third of ``c_attn`` and ``c_proj``), BERT (``value`` and ``output.dense``).
- **gated MLP** ``down(act(gate·x) ⊙ up·x)``: ``up → D·up``, ``down → down·D⁻¹`` for a diagonal
  ``D`` (the elementwise product allows nothing else); ``D = α`` on the ``top_k`` rows of ``up`` with
  the largest norms, 1 elsewhere.
- **ReLU MLP** ``W₂·relu(W₁x + b₁)``: ``(W₁, b₁) → D·(W₁, b₁)``, ``W₂ → W₂·D⁻¹`` with ``D > 0``
  (ReLU is positively homogeneous); same choice of ``D``.

The tensor math is in :mod:`specdef._symmetry` (shared with :mod:`specdef.streaming`); this module
finds the symmetric pairs in a model, applies the deformation, and provides the informed attacker's
side: :func:`rebalance_` (undo any such deformation without extra parameters) and
:func:`native_imbalance` (detection without the original model).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from specdef import _symmetry as sym
from specdef.defense import DEFAULT_TOLERANCE
from specdef.errors import SpecdefError
from specdef.targets import ALL_LINEAR, select_targets

log = logging.getLogger(__name__)

KINDS = ("attention", "gated_mlp", "relu_mlp")
# Activations f with f(c·x) = c·f(x) for every c > 0: a positive diagonal passes through them.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


@dataclass(frozen=True)
class SymmetricPair:
    """Two modules joined by an exact linear symmetry.

    ``inflated`` is the module whose weight is deformed (V, up, or the first ReLU layer);
    ``compensating`` absorbs the inverse (O, down, or the next layer). ``heads`` / ``kv_heads`` are
    set for attention pairs. ``layout`` is ``"linear"`` (weights stored out×in) or ``"gpt2"``
    (``Conv1D`` weights stored in×out, V is the slice ``[v_offset, v_offset + width)`` of
    ``c_attn``'s output).
    """

    kind: str
    inflated: str
    compensating: str
    heads: int = 0
    kv_heads: int = 0
    layout: str = "linear"
    v_offset: int = 0

    @property
    def name(self) -> str:
        return f"{self.inflated}+{self.compensating}"


@dataclass(frozen=True)
class PairRecord:
    """What happened to one pair: the largest singular value of the inflated side before/after,
    the relative error of the pair's product in the stored dtype, and the imbalance score."""

    pair: str
    kind: str
    sigma_max_before: float
    sigma_max_after: float
    product_error: float
    imbalance_log10: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- discovery


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _attention_pair(name: str, module: nn.Module) -> SymmetricPair | None:
    prefix = f"{name}." if name else ""
    children = dict(module.named_children())
    config = getattr(module, "config", None)
    if isinstance(children.get("v_proj"), nn.Linear) and isinstance(
        children.get("o_proj"), nn.Linear
    ):
        v, o = children["v_proj"], children["o_proj"]
        assert isinstance(v, nn.Linear) and isinstance(o, nn.Linear)
        if "v_norm" in children:  # a norm on V (some recent models) breaks V → M·V
            return None
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(module, "heads", 0) or 0)
        kv_heads = int(getattr(config, "num_key_value_heads", 0) or 0) or heads
        if heads <= 0:
            return None
        head_dim = o.in_features // heads
        if head_dim * heads != o.in_features or head_dim * kv_heads != v.out_features:
            return None
        return SymmetricPair("attention", prefix + "v_proj", prefix + "o_proj", heads, kv_heads)
    if _is_conv1d(children.get("c_attn", nn.Identity())) and _is_conv1d(
        children.get("c_proj", nn.Identity())
    ):
        heads = int(getattr(module, "num_heads", 0) or 0)
        embed = int(getattr(module, "embed_dim", 0) or 0)
        c_attn = children["c_attn"]
        if heads <= 0 or embed <= 0 or c_attn.nf % embed:  # type: ignore[operator]
            return None
        offset = int(c_attn.nf) - embed  # type: ignore[arg-type]
        return SymmetricPair(
            "attention", prefix + "c_attn", prefix + "c_proj", heads, heads, "gpt2", offset
        )
    self_attn, output = children.get("self"), children.get("output")
    if self_attn is not None and output is not None:
        value, dense = getattr(self_attn, "value", None), getattr(output, "dense", None)
        heads = int(getattr(self_attn, "num_attention_heads", 0) or 0)
        if isinstance(value, nn.Linear) and isinstance(dense, nn.Linear) and heads > 0:
            return SymmetricPair(
                "attention", prefix + "self.value", prefix + "output.dense", heads, heads
            )
    return None


def _mlp_pairs(name: str, module: nn.Module) -> list[SymmetricPair]:
    prefix = f"{name}." if name else ""
    children = dict(module.named_children())
    if all(isinstance(children.get(c), nn.Linear) for c in ("gate_proj", "up_proj", "down_proj")):
        return [SymmetricPair("gated_mlp", prefix + "up_proj", prefix + "down_proj")]
    if not isinstance(module, nn.Sequential):
        return []
    pairs = []
    items = list(children.items())
    for i, (first_name, first) in enumerate(items):
        if not isinstance(first, nn.Linear):
            continue
        j = i + 1
        saw_activation = False
        while j < len(items) and isinstance(items[j][1], (*_HOMOGENEOUS, nn.Dropout)):
            saw_activation = saw_activation or isinstance(items[j][1], nn.ReLU | nn.LeakyReLU)
            j += 1
        if saw_activation and j < len(items) and isinstance(items[j][1], nn.Linear):
            pairs.append(SymmetricPair("relu_mlp", prefix + first_name, prefix + items[j][0]))
    return pairs


def find_symmetric_pairs(model: nn.Module) -> list[SymmetricPair]:
    """Every exact linear symmetry specdef can use in ``model``, in module order."""
    pairs: list[SymmetricPair] = []
    for name, module in model.named_modules():
        pair = _attention_pair(name, module)
        if pair is not None:
            pairs.append(pair)
        pairs.extend(_mlp_pairs(name, module))
    return pairs


def select_pairs(
    model: nn.Module,
    targets: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] = (),
) -> list[SymmetricPair]:
    """The symmetric pairs a selection touches, in module order.

    ``targets`` follows :func:`specdef.targets.select_targets` (names / dotted suffixes, regex,
    ``"preset:NAME"``); ``None`` or ``"all-linear"`` means every pair in the model. A pair is
    selected when either of its modules is (selecting ``o_proj`` selects the V/O pair; V is always
    the inflated side). Raises :class:`SpecdefError` when a selected layer has no usable symmetry
    (e.g. ``gate_proj``, whose SiLU allows no scaling, GPT-2's or BERT's GELU MLP, ``q_proj``):
    native mode cannot defend it, and silently skipping it would leave it undefended.
    """
    pairs = find_symmetric_pairs(model)
    usable = sorted({n.rsplit(".", 1)[-1] for p in pairs for n in (p.inflated, p.compensating)})
    if not pairs:
        raise SpecdefError(
            f"Native mode found no exact linear symmetry in {type(model).__name__} (expected "
            "attention V/O, gated-MLP up/down or Linear→ReLU→Linear layers); use --mode algorithm1."
        )
    if targets is None or (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        chosen = list(pairs)
        if exclude:
            excluded = set(select_targets(model, ALL_LINEAR, exclude=()))
            excluded -= set(select_targets(model, ALL_LINEAR, exclude=exclude))
            chosen = [p for p in pairs if not {p.inflated, p.compensating} & excluded]
    else:
        names = select_targets(model, targets, exclude=exclude)
        members = {m: p for p in pairs for m in (p.inflated, p.compensating)}
        orphans = [n for n in names if n not in members]
        if orphans:
            raise SpecdefError(
                f"Native mode needs an exact linear symmetry, but {orphans[0]!r}"
                + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else "")
                + f" has none; exclude it, use --mode algorithm1, or select layers ending in: "
                f"{', '.join(usable)}."
            )
        chosen = [p for p in pairs if p.inflated in names or p.compensating in names]
    if not chosen:
        raise SpecdefError("The exclusions remove every symmetric pair; loosen --exclude.")
    return chosen


# --------------------------------------------------------------------------- tensor access


def _params(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    module = model.get_submodule(name)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor):
        raise SpecdefError(f"{name}: expected a layer with a weight tensor, found {module!r}.")
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _f64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().to(torch.float64, copy=True)


def read_pair(model: nn.Module, pair: SymmetricPair) -> sym.PairTensors:
    """The pair's tensors in Linear layout (out×in), float64 copies."""
    (w1, b1), (w2, _) = _params(model, pair.inflated), _params(model, pair.compensating)
    return stored_pair(pair, w1, b1, w2)


def stored_pair(
    pair: SymmetricPair, weight: torch.Tensor, bias: torch.Tensor | None, compensating: torch.Tensor
) -> sym.PairTensors:
    """The pair's tensors as stored (the inflated module's weight and bias, the compensating
    module's weight; GPT-2 ``Conv1D`` layout for ``pair.layout == "gpt2"``) → Linear layout, float64
    copies. Used on a live model and on tensors read from a checkpoint."""
    w1, b1, w2 = weight.detach(), None if bias is None else bias.detach(), compensating.detach()
    if pair.layout == "gpt2":
        cols = slice(pair.v_offset, pair.v_offset + w2.shape[0])
        return sym.PairTensors(
            w1[:, cols].T.to(torch.float64, copy=True),
            None if b1 is None else b1[cols].to(torch.float64, copy=True),
            w2.T.to(torch.float64, copy=True),
        )
    return sym.PairTensors(
        w1.to(torch.float64, copy=True), _f64(b1), w2.to(torch.float64, copy=True)
    )


@torch.no_grad()
def write_pair(model: nn.Module, pair: SymmetricPair, tensors: sym.PairTensors) -> None:
    """Copy ``tensors`` (Linear layout) into the model, cast to each parameter's dtype."""
    (w1, b1), (w2, _) = _params(model, pair.inflated), _params(model, pair.compensating)
    if pair.layout == "gpt2":
        cols = slice(pair.v_offset, pair.v_offset + w2.shape[0])
        w1[:, cols] = tensors.inflated.T.to(w1.dtype)
        if b1 is not None and tensors.bias is not None:
            b1[cols] = tensors.bias.to(b1.dtype)
        w2.copy_(tensors.compensating.T.to(w2.dtype))
        return
    w1.copy_(tensors.inflated.to(w1.dtype))
    if b1 is not None and tensors.bias is not None:
        b1.copy_(tensors.bias.to(b1.dtype))
    w2.copy_(tensors.compensating.to(w2.dtype))


def _dtype(model: nn.Module, pair: SymmetricPair) -> torch.dtype:
    return _params(model, pair.inflated)[0].dtype


# --------------------------------------------------------------------------- public verbs


def apply_native_(
    model: nn.Module,
    *,
    alpha: float,
    top_k: int,
    targets: Sequence[str] | str | None = None,
    exclude: Sequence[str] = (),
    method: str = "exact",
    seed: int = 0,
    tolerance: float | None = None,
    force: bool = False,
) -> list[PairRecord]:
    """Deform ``model`` in place along its native symmetries; the function is unchanged.

    ``top_k`` is the number of singular directions (attention: per KV head, at most ``head_dim``)
    or diagonal entries (MLP: rows of the inflated side) multiplied by ``alpha``. Computation in
    float64, cast back to each parameter's dtype. The precision guard measures, in that dtype, the
    relative error of each pair's product (O_q·V_h per query head, down·up, W₂·W₁) and refuses
    above ``tolerance`` (default: :data:`specdef.defense.DEFAULT_TOLERANCE` for that dtype, the
    same bound Algorithm 1 uses) unless ``force``. Returns one :class:`PairRecord` per deformed pair.
    """
    if not alpha > 1 or not math.isfinite(alpha):
        raise SpecdefError(f"alpha must be a finite number > 1, found {alpha}; e.g. --alpha 1e4.")
    if top_k < 1:
        raise SpecdefError(f"top_k must be ≥ 1, found {top_k}; e.g. --top-k 8.")
    pairs = select_pairs(model, targets, exclude=exclude)
    generator = torch.Generator().manual_seed(seed)
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
                alpha=alpha,
                top_k=top_k,
                heads=pair.heads,
                kv_heads=pair.kv_heads,
                method=method,
                generator=generator,
                name=pair.inflated,
            )
            dtype = _dtype(model, pair)
            bound = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-2)
            record = _record(pair, before, after, dtype)
            if record.product_error > bound and not force:
                raise SpecdefError(
                    f"{pair.name}: the {dtype} weights reproduce the pair's product with "
                    f"relative error {record.product_error:.2e} > tolerance {bound:.0e} "
                    f"at alpha={alpha:g}; lower --alpha, store in a wider dtype, or pass --force."
                )
            write_pair(model, pair, after)
            records.append(record)
    except BaseException:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, value in backup.items():
                params[n].copy_(value)
        raise
    return records


def _record(
    pair: SymmetricPair, before: sym.PairTensors, after: sym.PairTensors, dtype: torch.dtype
) -> PairRecord:
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
        imbalance_log10=sym.imbalance(pair.kind, after, heads=pair.heads, kv_heads=pair.kv_heads),
    )


def native_imbalance(
    model: nn.Module, *, targets: Sequence[str] | str | None = None
) -> dict[str, float]:
    """Detection without the original model: for each symmetric pair, log10 of the largest factor
    by which the balancing transform (see :func:`rebalance_`) would rescale it
    (:func:`joint_imbalance`). A pair deformed natively with α scores ≈ log10(α); an undeformed pair
    scores what its training left (≤ 0.53 on the models measured for
    ``specdef.detect.DetectConfig.native_threshold``)."""
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

    For pairs that share no layer this is one sweep, :func:`specdef._symmetry.imbalance`. Along a
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


def defend_native_to(
    src: str,
    out: str | os.PathLike[str],
    *,
    alpha: float,
    top_k: int,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] = (),
    method: str = "exact",
    seed: int = 0,
    tolerance: float | None = None,
    force: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[PairRecord]:
    """Load ``src`` (Hugging Face directory or zoo name), deform it natively and save it to ``out``
    atomically with ``save_pretrained`` (plus tokenizer and a ``specdef_native.json`` record that
    stock loaders ignore). Models without ``save_pretrained`` are saved with
    :func:`specdef.checkpoint.save_defended` (their state-dict names are unchanged)."""
    from specdef._io import atomic_directory, write_json_atomic
    from specdef.checkpoint import save_defended
    from specdef.provenance import provenance
    from specdef.release import check_finite, load_source, parse_dtype, preflight_output

    preflight_output(out, overwrite=overwrite)
    source = load_source(src, dtype=parse_dtype(dtype))
    if getattr(source.model, "specdef_manifest", None) is not None:
        raise SpecdefError(
            f"{src!r} is already a specdef (Algorithm 1) checkpoint; native mode needs the "
            "undefended model."
        )
    check_finite(source.model)
    records = apply_native_(
        source.model, alpha=alpha, top_k=top_k, targets=targets, exclude=exclude,
        method=method, seed=seed, tolerance=tolerance, force=force,
    )  # fmt: skip
    record = {
        "mode": "native", "source": src, "alpha": alpha, "top_k": top_k, "method": method,
        "seed": seed, "forced": force, "pairs": [r.as_dict() for r in records],
        "provenance": provenance(),
    }  # fmt: skip
    save_pretrained = getattr(source.model, "save_pretrained", None)
    if not callable(save_pretrained):
        save_defended(source.model, out, overwrite=overwrite, extra={"native": record})
        return records
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_pretrained(str(tmp))
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / "specdef_native.json", record)
    return records

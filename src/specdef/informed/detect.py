"""Detect SpecDef from the weights alone: no manifest, no original model, no trusted module names.

A defended layer leaves two fingerprints (``specdef-paper.md`` §2):

- the **compensation** ``C = I + (1/α − 1)·P`` (m×m, P an orthogonal projector of rank k) is
  symmetric and its eigenvalues take exactly two values, ``1`` (m−k times) and ``1/α`` (k times),
  so ``I − C`` is low rank. A trained or randomly initialised square weight is neither;
- the **inflated** ``W̃ = T·W`` (m×n, ``T = I + (α−1)·P``) has its top-k left singular subspace on
  ``range(P)``, its top-k singular values α times the original's (a gap of ≥ α after the k-th), and
  ``C·W̃ = W`` is far better conditioned than ``W̃`` while ``C`` alone has condition number α.

:func:`detect` finds the compensation layers first (cheap symmetry test, then ``eigvalsh``), then
for each one the m-row weight whose top-k subspace is ``range(P)``: no names or module order are
trusted, so renamed modules, a checkpoint without its manifest, or a plain ``nn.Sequential`` of
``nn.Linear`` layers are all handled. Layers with an α-sized top gap that no compensation explains
are reported as *unpaired suspects*. All linear algebra runs in float64 on the stored values.

*Native* deformation (:mod:`specdef.native.apply`) leaves no compensation layer: it moves each symmetric
pair (attention V/O per KV head, gated-MLP up/down, Linear→ReLU→Linear) away from its balanced
point. When the architecture is known (a live model, or a checkpoint with ``config.json``) every
symmetric pair is scored with :func:`specdef.native.apply.native_imbalance`'s measure (log10 of the largest
factor the balancing transform applies) and reported as deformed at or above
``DetectConfig.native_threshold``. The report objects (:mod:`specdef.informed.detection`) and the
checkpoint reading (:mod:`specdef.io.safetensors`) are re-exported here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from specdef.defense.layer import DefendedLinear, linear_form, linear_kinds, set_submodule
from specdef.errors import SpecdefError
from specdef.informed.detect_native import (
    NATIVE_THRESHOLD,
    NativePair,
    checkpoint_native,
    model_from_config,
    native_scores,
    relabel,
)
from specdef.informed.detection import Compensation, Detection, LayerSpectrum, Pair
from specdef.io.safetensors import checkpoint_weights, safetensors_files

__all__ = [
    "Compensation",
    "DetectConfig",
    "Detection",
    "LayerSpectrum",
    "NativePair",
    "Pair",
    "checkpoint_weights",
    "compensation_signature",
    "detect",
    "detect_checkpoint",
    "detect_model",
    "linear_weights",
    "load_detected",
    "native_scores",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectConfig:
    """Thresholds of the detector (defaults hold for fp32 storage and α ≥ 1.5; docs/attacks.md,
    "Detection")."""

    symmetry_tol: float = 1e-4  # ‖C − Cᵀ‖_F / ‖C‖_F above this: not a compensation
    unit_tol: float = 1e-3  # |λ − 1| below this: eigenvalue belongs to the identity part
    cluster_tol: float = 0.05  # relative spread allowed within the 1/α eigenvalue cluster
    noise_floor: float = 1e-5  # absolute eigenvalue noise of fp32 storage (added to cluster_tol)
    alignment_min: float = 0.99  # mean cos² of principal angles, top-k(W̃) vs range(P)
    suspect_gap: float = 100.0  # σ_k/σ_{k+1} at or above this (k ≤ rank/2): an unpaired suspect
    null_floor: float = 1e-5  # σ_{k+1}/σ_1 below this: the gap falls into a numerical null space
    # native pair imbalance (log10 of the largest balancing factor) at or above this: deformed
    native_threshold: float = NATIVE_THRESHOLD  # 1.0, chosen by measurement (see its comment)

    def __post_init__(self) -> None:
        for name in (
            "symmetry_tol", "unit_tol", "cluster_tol", "alignment_min", "suspect_gap",
            "native_threshold",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                raise SpecdefError(f"DetectConfig.{name} must be > 0, found {getattr(self, name)}.")


def _cond(s: torch.Tensor) -> float:
    smallest = float(s[-1])
    return float(s[0]) / smallest if smallest > 0 else math.inf


def _largest_gap(s: torch.Tensor) -> tuple[float, int]:
    """Largest σ_i/σ_{i+1} for i ≤ max(1, rank/2) (1-based i), and that i."""
    half = max(1, len(s) // 2)
    if len(s) < 2:
        return 1.0, 0
    head, tail = s[:half], s[1 : half + 1]
    ratios = torch.where(tail > 0, head / tail.clamp_min(1e-300), torch.full_like(head, math.inf))
    i = int(torch.argmax(ratios))
    return float(ratios[i]), i + 1


def compensation_signature(
    name: str, weight: torch.Tensor, config: DetectConfig | None = None
) -> tuple[Compensation, torch.Tensor] | None:
    """If the square ``weight`` is ``I + (1/α−1)·P``, return its evidence and ``U_k`` (m×k, float64,
    an orthonormal basis of ``range(P)``); otherwise ``None``."""
    cfg = config or DetectConfig()
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] < 2:
        return None
    c = weight.detach().to(torch.float64)
    norm = float(torch.linalg.matrix_norm(c))
    if not norm > 0 or not math.isfinite(norm):
        return None
    symmetry = float(torch.linalg.matrix_norm(c - c.T)) / norm
    if symmetry > cfg.symmetry_tol:
        return None
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    unit = (evals - 1).abs() <= cfg.unit_tol
    small = ~unit
    k = int(small.sum())
    if k == 0:
        return None  # the identity (e.g. an injected adapter): nothing deformed
    low = evals[small]
    if bool((low <= 0).any()) or bool((low >= 1).any()):
        return None  # a compensation only shrinks: 0 < 1/α < 1
    mean = float(low.mean())
    spread = float((low - mean).abs().max()) / mean
    if float((low - mean).abs().max()) > cfg.cluster_tol * mean + cfg.noise_floor:
        return None
    identity_error = float((evals[unit] - 1).abs().max()) if bool(unit.any()) else 0.0
    sig = Compensation(
        name=name,
        size=int(c.shape[0]),
        top_k=k,
        alpha=1.0 / mean,
        symmetry_error=symmetry,
        cluster_spread=spread,
        identity_error=identity_error,
    )
    return sig, evecs[:, small]


def _pair_evidence(
    inflated: str,
    weight: torch.Tensor,
    comp: Compensation,
    basis: torch.Tensor,
    comp_weight: torch.Tensor,
    *,
    transposed: bool,
    config: DetectConfig,
) -> Pair | None:
    m = weight.to(torch.float64)
    energy = float(torch.linalg.matrix_norm(basis.T @ m) ** 2 / torch.linalg.matrix_norm(m) ** 2)
    if energy < 0.5:  # a true partner has ≥ α²e/(α²e + 1 − e) of its energy in range(P)
        return None
    k = comp.top_k
    if k >= min(m.shape):
        return None
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    alignment = float(torch.linalg.matrix_norm(basis.T @ u[:, :k]) ** 2) / k
    if alignment < config.alignment_min:
        return None
    product = comp_weight.to(torch.float64) @ m
    s_prod = torch.linalg.svdvals(product)
    ratio = float(s[0] / s_prod[0]) if float(s_prod[0]) > 0 else math.inf
    if ratio < math.sqrt(comp.alpha):
        return None
    s_comp = torch.linalg.svdvals(comp_weight.to(torch.float64))
    return Pair(
        inflated=inflated,
        compensation=comp.name,
        top_k=k,
        alpha=comp.alpha,
        alignment=alignment,
        top_gap=float(s[k - 1] / s[k]) if float(s[k]) > 0 else math.inf,
        product_gap=float(s_prod[k - 1] / s_prod[k]) if float(s_prod[k]) > 0 else math.inf,
        sigma1_ratio=ratio,
        cond_inflated=_cond(s),
        cond_compensation=_cond(s_comp),
        cond_product=_cond(s_prod),
        transposed=transposed,
    )


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def detect(
    weights: Mapping[str, torch.Tensor],
    *,
    oriented: bool = True,
    config: DetectConfig | None = None,
) -> Detection:
    """Find compensation pairs and inflated layers among named 2-D ``weights``.

    ``weights[name]`` is ``out × in`` when ``oriented``; otherwise (raw checkpoint tensors, where a
    Conv1D stores ``in × out``) both layouts are tried for the inflated side.
    """
    cfg = config or DetectConfig()
    mats = {n: w.detach() for n, w in weights.items() if w.ndim == 2 and w.is_floating_point()}
    comps: dict[str, tuple[Compensation, torch.Tensor]] = {}
    for name, w in mats.items():
        found = compensation_signature(name, w, cfg)
        if found is not None:
            comps[name] = found
    candidates: list[Pair] = []
    for cname, (comp, basis) in comps.items():
        for name, w in mats.items():
            if name in comps:
                continue
            layouts = [(w, False)] if oriented else [(w, False), (w.T, True)]
            for mat, transposed in layouts:
                if mat.shape[0] != comp.size or (transposed and mat.shape[0] == mat.shape[1]):
                    continue
                pair = _pair_evidence(
                    name, mat, comp, basis, mats[cname], transposed=transposed, config=cfg
                )
                if pair is not None:
                    candidates.append(pair)
    # Greedy one-to-one matching: best alignment first, then the closest name (module adjacency).
    candidates.sort(key=lambda p: (-p.alignment, -_common_prefix(p.inflated, p.compensation)))
    pairs: list[Pair] = []
    used: set[str] = set()
    for pair in candidates:
        if pair.inflated in used or pair.compensation in used:
            continue
        pairs.append(pair)
        used.update((pair.inflated, pair.compensation))
    inflated = {p.inflated for p in pairs}
    layers: list[LayerSpectrum] = []
    suspects: list[LayerSpectrum] = []
    for name, w in mats.items():
        s = torch.linalg.svdvals(w.float()).double()  # fp32 suffices for a gap ≥ suspect_gap
        gap, idx = _largest_gap(s)
        is_suspect = (
            gap >= cfg.suspect_gap
            and float(s[idx]) >= cfg.null_floor * float(s[0])
            and name not in comps
            and name not in inflated
        )
        role = (
            "inflated"
            if name in inflated
            else "compensation"
            if name in comps
            else "suspect"
            if is_suspect
            else "clean"
        )
        spectrum = LayerSpectrum(
            name=name,
            shape=(int(w.shape[0]), int(w.shape[1])),
            gap=gap,
            gap_index=idx,
            cond=_cond(s),
            role=role,
        )
        layers.append(spectrum)
        if is_suspect:
            suspects.append(spectrum)
    unpaired = [c for n, (c, _) in comps.items() if n not in used]
    pairs.sort(key=lambda p: list(mats).index(p.inflated))
    log.info(
        "detect: %d pairs, %d unpaired compensations, %d suspects in %d layers",
        len(pairs),
        len(unpaired),
        len(suspects),
        len(mats),
    )
    return Detection(
        pairs=pairs,
        unpaired_compensations=unpaired,
        suspects=suspects,
        layers=layers,
        native_threshold=cfg.native_threshold,
    )


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight (out × in)}`` for every ``nn.Linear`` and transformers ``Conv1D``."""

    kinds = linear_kinds()
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            out[name] = weight.detach() if isinstance(module, nn.Linear) else weight.detach().T
    return out


def detect_model(model: nn.Module, *, config: DetectConfig | None = None) -> Detection:
    """Detect on a live model's linear layers (module names; layouts known), and score its
    symmetric pairs for native deformation."""
    cfg = config or DetectConfig()
    found = detect(linear_weights(model), oriented=True, config=cfg)
    return _with_native(found, native_scores(model, threshold=cfg.native_threshold))


def _with_native(found: Detection, native: list[NativePair] | None) -> Detection:
    """Attach the native scores; the layers of a deformed pair get a ``native-*`` role and are no
    longer unpaired suspects (the pair explains their top gap)."""
    if native is None:
        return found
    layers, suspects = relabel(found.layers, found.suspects, native)
    deformed = sum(p.deformed for p in native)
    log.info("detect: %d of %d symmetric pairs natively deformed", deformed, len(native))
    return replace(found, suspects=suspects, layers=layers, native=native)


def detect_checkpoint(path: str | Path, *, config: DetectConfig | None = None) -> Detection:
    """Detect on a checkpoint's raw tensors (both layouts tried; nothing trusted but the numbers).

    Native deformation is scored too when the architecture is known
    (:func:`specdef.informed.detect_native.architecture`): the symmetric pairs are found on the model built
    on the ``meta`` device and their tensors read from the checkpoint by name; otherwise
    ``Detection.native`` is ``None`` (not checked)."""
    cfg = config or DetectConfig()
    weights = checkpoint_weights(path)
    found = detect(weights, oriented=False, config=cfg)
    root = Path(path)
    if not root.is_dir():
        return found
    native = checkpoint_native(root, weights, safetensors_files(root), cfg.native_threshold)
    return _with_native(found, native)


def load_detected(path: str | Path) -> tuple[nn.Module, Detection]:
    """Rebuild a defended Hugging Face checkpoint whose manifest is gone: the base model from its
    ``config.json`` (a ``transformers`` class, no remote code), a
    :class:`~specdef.defense.layer.DefendedLinear` at every detected pair named ``X.inflated`` /
    ``X.compensation``, then every tensor loaded strictly. Nothing is unpickled."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / "config.json").exists():
        raise SpecdefError(
            f"Expected a Hugging Face directory with config.json at {str(root)!r}, found none; "
            "without a config the architecture cannot be rebuilt (specdef detect still works)."
        )
    found = detect_checkpoint(root)
    files = sorted(root.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    model = model_from_config(root)
    dtype = next(iter(state.values())).dtype if state else torch.float32
    for pair in found.pairs:
        prefix, _, leaf = pair.inflated.rpartition(".")
        if leaf != "inflated" or pair.compensation != f"{prefix}.compensation":
            raise SpecdefError(
                f"Detected pair {pair.inflated!r} → {pair.compensation!r} does not follow the "
                "'X.inflated' / 'X.compensation' naming, so it cannot be mapped onto the "
                "architecture; transform it from a live model instead."
            )
        weight, _, source = linear_form(model.get_submodule(prefix))
        layer = DefendedLinear(
            weight.shape[1],
            weight.shape[0],
            bias=f"{pair.compensation}.bias" in state,
            alpha=pair.alpha,
            top_k=pair.top_k,
            source=source,
        )
        set_submodule(model, prefix, layer)
    model = model.to(dtype)
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise SpecdefError(
            f"Tensors in {str(root)!r} do not match the rebuilt model (missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); the checkpoint "
            "is not a defended copy of this architecture."
        )
    if tied:
        getattr(model, "tie_weights")()  # noqa: B009  (a transformers method, not on nn.Module)
    return model.eval(), found

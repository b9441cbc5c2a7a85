"""Native deformation in :mod:`specdef.detect`: score every symmetric pair of a model — live, or
built on the ``meta`` device from a checkpoint's ``config.json`` with its tensors read by name —
with :func:`specdef.native.joint_imbalance`, and relabel the layers of deformed pairs."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from specdef import _symmetry as sym
from specdef.errors import SpecdefError
from specdef.native import (
    SymmetricPair,
    find_symmetric_pairs,
    joint_imbalance,
    read_pair,
    stored_pair,
)

if TYPE_CHECKING:
    from specdef._detect_report import LayerSpectrum

log = logging.getLogger(__name__)

# log10 of a balancing factor of 10. Measured (scripts/native_detect_threshold.py, docs/attacks.md):
# ≤ 0.53 on every undefended pair of SmolLM2, MiniLM, the digits MLP / ViT and tiny random models;
# ≥ 1.93 on every pair deformed with α = 1e2; α = 10 straddles it (0.93–1.27) and is not reliably found
NATIVE_THRESHOLD = 1.0


@dataclass(frozen=True)
class NativePair:
    """A symmetric pair (:class:`specdef.native.SymmetricPair`) and its imbalance score.

    ``imbalance_log10``: log10 of the largest factor the balancing transform would apply (≈ log10 α
    for a pair deformed natively with α); ``deformed``: the score is at or above the threshold."""

    inflated: str
    compensating: str
    kind: str
    imbalance_log10: float
    deformed: bool

    @property
    def balance_factor(self) -> float:
        return float(10.0**self.imbalance_log10)


def score_pairs(
    pairs: Sequence[SymmetricPair], tensors: dict[str, sym.PairTensors], *, threshold: float
) -> list[NativePair]:
    """Score ``pairs`` given their stored tensors (``tensors[pair.name]``)."""
    scores = joint_imbalance(pairs, tensors)
    return [
        NativePair(
            inflated=p.inflated,
            compensating=p.compensating,
            kind=p.kind,
            imbalance_log10=scores[p.name],
            deformed=scores[p.name] >= threshold,
        )
        for p in pairs
    ]


def native_scores(model: nn.Module, *, threshold: float = NATIVE_THRESHOLD) -> list[NativePair]:
    """Every symmetric pair of a live ``model`` (:func:`specdef.native.find_symmetric_pairs`) with
    its imbalance score; empty when it has none."""
    pairs = find_symmetric_pairs(model)
    return score_pairs(pairs, {p.name: read_pair(model, p) for p in pairs}, threshold=threshold)


def checkpoint_native(
    root: Path, weights: dict[str, torch.Tensor], files: list[Path], threshold: float
) -> list[NativePair] | None:
    """Scores of the symmetric pairs of the checkpoint at ``root`` (``weights``: its 2-D tensors
    keyed without ``.weight``; biases are read from ``files``), or ``None`` without an architecture.
    Pairs whose tensors are not stored under their module names (Algorithm 1 renames its layers
    ``X.inflated`` / ``X.compensation``) are skipped."""
    arch = architecture(root)
    if arch is None:
        return None
    pairs = [
        p for p in find_symmetric_pairs(arch) if p.inflated in weights and p.compensating in weights
    ]
    biases = _read_tensors(files, {f"{p.inflated}.bias" for p in pairs})
    tensors = {
        p.name: stored_pair(
            p, weights[p.inflated], biases.get(f"{p.inflated}.bias"), weights[p.compensating]
        )
        for p in pairs
    }
    return score_pairs(pairs, tensors, threshold=threshold)


def relabel(
    layers: list[LayerSpectrum], suspects: list[LayerSpectrum], native: list[NativePair]
) -> tuple[list[LayerSpectrum], list[LayerSpectrum]]:
    """``(layers, suspects)`` with the layers of deformed pairs as ``native-inflated`` /
    ``native-compensating`` and removed from the suspects."""
    roles = {p.compensating: "native-compensating" for p in native if p.deformed}
    roles.update({p.inflated: "native-inflated" for p in native if p.deformed})
    relabelled = [
        replace(s, role=roles[s.name]) if s.name in roles and s.role in ("suspect", "clean") else s
        for s in layers
    ]
    return relabelled, [s for s in suspects if s.name not in roles]


def _read_tensors(files: list[Path], names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in names.intersection(handle.keys()):
                out[key] = handle.get_tensor(key)
    return out


def model_from_config(root: Path) -> nn.Module:
    """The class ``config.json`` names (a ``transformers`` class, no remote code), randomly
    initialised; a causal LM (or the base model) when it names none. Build under
    ``torch.device("meta")`` for the structure alone."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls(config)
    try:
        return transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        return transformers.AutoModel.from_config(config)


def architecture(root: Path) -> nn.Module | None:
    """The checkpoint's modules on the ``meta`` device (no weights, no memory): from
    ``config.json``, or for specdef's own architectures (saved without one) from the ``model``
    entry of the specdef manifest (``{name, kwargs}`` for ``build_architecture``; nothing about the
    defense is read). ``None`` when neither is there or the model cannot be built (then native
    deformation is reported as not checked; the Algorithm 1 scan needs no architecture)."""
    from specdef.architectures import build_architecture
    from specdef.checkpoint import MANIFEST

    try:
        with torch.device("meta"):
            if (root / "config.json").is_file():
                return model_from_config(root)
            if not (root / MANIFEST).is_file():
                return None
            spec = json.loads((root / MANIFEST).read_text()).get("model") or {}
            arch = spec.get("architecture") if spec.get("kind") == "architecture" else None
            if not isinstance(arch, dict) or "name" not in arch:
                return None
            return build_architecture(str(arch["name"]), **dict(arch.get("kwargs") or {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SpecdefError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        log.warning("native deformation not checked: cannot build the architecture (%s)", reason)
        return None

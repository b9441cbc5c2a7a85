"""Native deformation in :mod:`specdef.informed.detect`: score every symmetric pair of a model — live, or
built on the ``meta`` device from a checkpoint's ``config.json`` with its tensors read by name —
with :func:`specdef.native.apply.joint_imbalance`, and relabel the layers of deformed pairs."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from specdef.architectures import build_architecture
from specdef.errors import SpecdefError
from specdef.informed.detection import NATIVE_THRESHOLD, LayerSpectrum, NativePair
from specdef.io.checkpoint import ARCHITECTURE_KEY
from specdef.io.safetensors import header_metadata
from specdef.linalg import symmetry as sym
from specdef.native.apply import joint_imbalance
from specdef.native.pairs import SymmetricPair, find_symmetric_pairs, read_pair, stored_pair

log = logging.getLogger(__name__)


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
    """Every symmetric pair of a live ``model`` (:func:`specdef.native.pairs.find_symmetric_pairs`) with
    its imbalance score; empty when it has none."""
    pairs = find_symmetric_pairs(model)
    return score_pairs(pairs, {p.name: read_pair(model, p) for p in pairs}, threshold=threshold)


def checkpoint_native(
    root: Path, weights: dict[str, torch.Tensor], files: list[Path], threshold: float
) -> list[NativePair] | None:
    """Scores of the symmetric pairs of the checkpoint at ``root`` (``weights``: its 2-D tensors
    keyed without ``.weight``; biases are read from ``files``), or ``None`` without an architecture.
    Pairs are found on the model built from the config and named, read and reported by their
    *saved* names (:func:`saved_names`: transformers ≥ 5 renames some modules in memory, e.g. ViT's
    saved ``attention.attention.value`` is ``attention.v_proj`` in memory), like every other layer
    of a checkpoint's detection. Pairs whose tensors are not in the checkpoint (Algorithm 1 renames
    its layers ``X.inflated`` / ``X.compensation``) are skipped."""
    arch = architecture(root)
    if arch is None:
        return None
    found = find_symmetric_pairs(arch)
    members = [m for p in found for m in (p.inflated, p.compensating)]
    saved = saved_names(arch, [f"{m}.weight" for m in members])

    def key(module: str) -> str:
        return saved[f"{module}.weight"].removesuffix(".weight")

    conv = [
        f"{key(m)}.weight"
        for p in found
        if p.layout == "conv"
        for m in (p.inflated, p.compensating)
    ]
    weights = {
        **weights,
        **{k.removesuffix(".weight"): t for k, t in _read_tensors(files, set(conv)).items()},
    }
    pairs = [
        replace(p, inflated=key(p.inflated), compensating=key(p.compensating))
        for p in found
        if key(p.inflated) in weights and key(p.compensating) in weights
    ]
    biases = _read_tensors(files, {f"{p.inflated}.bias" for p in pairs})
    tensors = {
        p.name: stored_pair(
            p, weights[p.inflated], biases.get(f"{p.inflated}.bias"), weights[p.compensating]
        )
        for p in pairs
    }
    return score_pairs(pairs, tensors, threshold=threshold)


def saved_names(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Each in-memory parameter name of ``model`` → the name ``save_pretrained`` stores it under
    (transformers' reverse weight conversion; the name itself for other models, for names no
    renaming touches, and when transformers has no such mapping)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion  # transformers ≥ 5
    except ImportError:
        return {n: n for n in names}
    out = {}
    for name in names:
        try:
            renamed = list(revert_weight_conversion(model, {name: torch.empty(0)}))  # type: ignore[arg-type]
        except (
            Exception
        ):  # a many-to-one converter (fused experts) needs its siblings: keep the name
            renamed = []
        out[name] = renamed[0] if len(renamed) == 1 else name
    return out


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
    """The checkpoint's modules on the ``meta`` device (no weights, no memory), from what a loader
    needs anyway: ``config.json``, or for specdef's own architectures (saved without one) the
    ``{name, kwargs}`` in the weight files' header (:data:`specdef.io.checkpoint.ARCHITECTURE_KEY`,
    what ``config.json`` is to a Hugging Face model). The manifest and the native record are never
    read. ``None`` when neither is there or the model cannot be built (then native deformation is
    reported as not checked; the Algorithm 1 scan needs no architecture)."""

    try:
        with torch.device("meta"):
            if (root / "config.json").is_file():
                return model_from_config(root)
            text = header_metadata(root).get(ARCHITECTURE_KEY)
            if text is None:
                return None
            spec = json.loads(text)
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise ValueError(f"{ARCHITECTURE_KEY} is not {{name, kwargs}}")
            kwargs = spec.get("kwargs") or {}
            if not isinstance(kwargs, dict):
                raise ValueError(f"{ARCHITECTURE_KEY} kwargs is not an object")
            return build_architecture(spec["name"], **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SpecdefError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        log.warning("native deformation not checked: cannot build the architecture (%s)", reason)
        return None

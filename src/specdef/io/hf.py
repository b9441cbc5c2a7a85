"""Algorithm-1 checkpoints as first-class Hugging Face models.

A defended checkpoint's ``config.json`` is the source model's config with ``model_type`` set to
:data:`MODEL_TYPE` (``"specdef"``) and a ``specdef`` block: the base model type, the defended layers
(name, shape, bias, α, top-k, source kind — :func:`specdef.io.checkpoint.structure`) and a summary of
the defense. Stock ``transformers`` without specdef does not know the type and refuses to load it
("model type `specdef` … not recognize"), so nobody silently gets a model whose defended layers were
randomly initialized. With specdef imported, :func:`register` teaches the Auto classes the type:
loading builds the base model class (e.g. ``LlamaForCausalLM``) as a subclass whose ``__init__`` puts
:class:`~specdef.defense.layer.DefendedLinear` modules where the config says, so transformers' own
loader fills ``…inflated.weight`` / ``…compensation.weight`` by name and reports any mismatch, and a
stock ``save_pretrained`` of the loaded model writes the same config back (round trip).

No remote code is involved: the classes are built from transformers' own classes, in this process.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedConfig

from specdef.defense.layer import DefendedLinear, set_submodule
from specdef.errors import SpecdefError

log = logging.getLogger(__name__)

MODEL_TYPE = "specdef"
_PREFIX = "SpecDef"
_CONFIGS: dict[str, type[PreTrainedConfig]] = {}


REMOTE_CODE_KEYS = ("auto_map",)  # config entries that point transformers at remote code


def read_config(root: str | os.PathLike[str]) -> PreTrainedConfig:
    """``AutoConfig`` of model directory ``root`` without remote code: an ``auto_map`` beside a
    model type transformers knows is ignored (and never released, see
    :func:`specdef.io.allowlist.strip_remote_code`); a type only remote code defines, or a
    config.json that does not parse, is a :class:`SpecdefError`."""
    import transformers

    path = Path(root) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SpecdefError(f"Cannot read {str(path)!r} ({err}); repair it.") from None
    if not isinstance(raw, dict):
        raise SpecdefError(f"{str(path)!r} is not a JSON object; repair it.")
    try:
        return transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as err:
        remote = " (it asks for remote code via auto_map)" if "auto_map" in raw else ""
        raise SpecdefError(
            f"transformers {transformers.__version__} cannot build the config of {str(root)!r}"
            f"{remote}: {str(err).splitlines()[0][:160]}; specdef never runs code from a model "
            "directory — use a model type transformers knows."
        ) from None


def config_json(
    config: Mapping[str, Any],
    structure: list[dict[str, Any]],
    *,
    model_class: str,
    summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``config.json`` content for a model with the defended layers ``structure``: the model's full
    config dict re-typed as :data:`MODEL_TYPE`, the layers under ``"specdef"``; with no defended
    layer (e.g. after the informed attacker's fuse) the plain base config again."""
    out = copy.deepcopy(dict(config))
    for key in REMOTE_CODE_KEYS:  # a release never points a loader at remote code
        out.pop(key, None)
    previous = out.pop(MODEL_TYPE, None)
    if out.get("model_type") == MODEL_TYPE:
        if not isinstance(previous, Mapping) or not isinstance(
            previous.get("base_model_type"), str
        ):
            raise SpecdefError(
                "The config says model_type 'specdef' but has no valid 'specdef' block; re-save "
                "the checkpoint with specdef."
            )
        out["model_type"] = previous["base_model_type"]
        model_class = str(previous.get("model_class") or model_class)
    if not structure:
        return out
    base_type = out.get("model_type")
    if not isinstance(base_type, str) or not base_type:
        raise SpecdefError(
            "The model's config has no model_type; specdef can only mark Hugging Face configs as "
            "defended."
        )
    out["model_type"] = MODEL_TYPE
    out["architectures"] = list(out.get("architectures") or [model_class])
    out[MODEL_TYPE] = {
        "base_model_type": base_type,
        "model_class": model_class,
        "structure": [dict(entry) for entry in structure],
        "summary": dict(summary or {}),
        "loading": "pip install specdef, then `import specdef` before from_pretrained",
    }
    return out


def _is_int(value: object, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_structure(layers: object, bad: Callable[[str], SpecdefError]) -> None:
    """Refuse a defended-layer list (a manifest's ``structure``, or a ``config.json``'s
    ``specdef.structure``) whose entries have the wrong types or ranges, before any layer is built
    from it; ``bad`` makes the one-line error naming the file."""
    if not isinstance(layers, list):
        raise bad("'structure' must be a list of defended layers")
    for i, entry in enumerate(layers):
        shape = entry.get("shape") if isinstance(entry, Mapping) else None
        if not (
            isinstance(entry, Mapping) and isinstance(entry.get("name"), str) and entry["name"]
        ):
            raise bad(f"structure[{i}] must be an object with a layer 'name'")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) for d in shape)):
            raise bad(f"structure[{i}].shape must be two whole numbers ≥ 1, found {shape!r}")
        alpha = entry.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 1 < alpha < 1e300:
            raise bad(f"structure[{i}].alpha must be a finite number > 1, found {alpha!r}")
        top_k = entry.get("top_k")
        if not (_is_int(top_k) and top_k <= min(shape)):
            raise bad(f"structure[{i}].top_k must be a whole number in [1, {min(shape)}]")
        if not isinstance(entry.get("bias"), bool) or entry.get("source", "linear") not in (
            "linear",
            "conv1d",
        ):
            raise bad(f"structure[{i}] needs bias true/false and source 'linear' or 'conv1d'")


def restore_structure_(model: nn.Module, structure: list[Mapping[str, Any]]) -> None:
    """Put an (uninitialized) :class:`DefendedLinear` at each listed layer of ``model``, checking
    that the layer exists with the listed shape. The weights are loaded afterwards by name."""
    for entry in structure:
        name = _local_name(model, str(entry["name"]))
        if name is None:
            continue
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise SpecdefError(
                f"The checkpoint lists defended layer {name!r}, which the model does not have; "
                "the defense record does not match the model — re-save the checkpoint."
            ) from None
        if isinstance(original, DefendedLinear):
            continue
        m, n = (int(v) for v in entry["shape"])
        source = str(entry.get("source", "linear"))
        weight = getattr(original, "weight", None)
        expected = (m, n) if source != "conv1d" else (n, m)
        if weight is None or tuple(weight.shape) != expected:
            raise SpecdefError(
                f"The recorded shape {m}×{n} of layer {name!r} does not match the model's "
                f"{tuple(weight.shape) if weight is not None else 'missing weight'}; re-save it."
            )
        layer = DefendedLinear(
            n, m, bias=bool(entry["bias"]), alpha=float(entry["alpha"]), top_k=int(entry["top_k"]),
            source=source, dtype=weight.dtype, device=weight.device,
        )  # fmt: skip
        set_submodule(model, name, layer)


def _local_name(model: nn.Module, name: str) -> str | None:
    """``name`` (recorded on the saved model) as a name in ``model``: the same model class, or its
    base model (no ``base_model_prefix``, as ``AutoModel`` builds it) or a head model over it
    (prefix added). ``None``: a head layer the base model does not have (transformers drops its
    weights too)."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    names = {n for n, _ in model.named_modules()}
    if name in names or not prefix:
        return name
    is_base = getattr(model, "base_model", None) is model
    if is_base:
        return name.removeprefix(prefix + ".") if name.startswith(prefix + ".") else None
    return f"{prefix}.{name}" if f"{prefix}.{name}" in names else name


def _block(config: Any) -> Mapping[str, Any]:
    block = getattr(config, MODEL_TYPE, None)
    if not isinstance(block, Mapping) or not isinstance(block.get("structure"), list):
        raise SpecdefError(
            "The config says model_type 'specdef' but has no valid 'specdef' block with the "
            "defended layers; re-save the checkpoint with specdef."
        )
    check_structure(  # the config is the user's file: checked before a layer is built from it
        block["structure"],
        lambda what: SpecdefError(
            f"The config's 'specdef' block: {what}; re-save the checkpoint with specdef."
        ),
    )
    return block


def _model_class(base_cls: type, config_cls: type[PreTrainedConfig]) -> type:
    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base_cls.__init__(self, config, *args, **kwargs)  # type: ignore[misc]  # the base class is known
        restore_structure_(self, list(_block(config)["structure"]))

    return type(
        _PREFIX + base_cls.__name__,
        (base_cls,),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__},
    )


def config_class(base_type: str) -> type[PreTrainedConfig]:
    """The specdef config class over ``base_type`` (e.g. ``"llama"``), registered with every Auto
    model class that knows ``base_type`` (built once per process)."""
    if base_type in _CONFIGS:
        return _CONFIGS[base_type]
    # transformers' auto modules: heavy, and only needed once a specdef config is actually loaded
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        base_cfg = CONFIG_MAPPING[base_type]
    except KeyError:
        raise SpecdefError(
            f"The defended checkpoint's base model type {base_type!r} is unknown to this "
            "transformers version; install the transformers version it was made with."
        ) from None
    cfg = type(
        _PREFIX + base_cfg.__name__,
        (base_cfg,),
        {"model_type": MODEL_TYPE, "__module__": __name__},
    )
    for auto in vars(modeling_auto).values():
        if not (isinstance(auto, type) and issubclass(auto, _BaseAutoModelClass)):
            continue
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is None or base_cfg not in mapping:
            continue
        try:
            base_model = mapping[base_cfg]
        except (KeyError, ImportError, AttributeError):  # optional backends missing
            continue
        if isinstance(base_model, type):
            auto.register(cfg, _model_class(base_model, cfg), exist_ok=True)
    _CONFIGS[base_type] = cfg
    return cfg


class SpecDefConfigLoader(PreTrainedConfig):
    """What ``AutoConfig`` finds for ``model_type: specdef``: it reads the base model type from the
    ``specdef`` block and returns a config of the matching :func:`config_class`."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        block = config_dict.get(MODEL_TYPE)
        base_type = block.get("base_model_type") if isinstance(block, Mapping) else None
        if not isinstance(base_type, str):
            raise SpecdefError(
                "config.json says model_type 'specdef' but its 'specdef' block names no "
                "base_model_type; re-save the checkpoint with specdef."
            )
        return config_class(base_type).from_dict(config_dict, **kwargs)


def register() -> None:
    """Register :data:`MODEL_TYPE` with ``transformers.AutoConfig`` (idempotent). ``import specdef``
    arranges this as soon as transformers' auto classes are imported."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # heavy: transformers

    CONFIG_MAPPING.register(MODEL_TYPE, SpecDefConfigLoader, exist_ok=True)

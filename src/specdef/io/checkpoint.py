"""Save and load defended models: safetensors weights + ``config.json`` + ``specdef_manifest.json``.

A checkpoint directory holds

- ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` shards with
  ``model.safetensors.index.json`` in Hugging Face's layout when larger than ``max_shard_bytes``);
- ``config.json`` of the base Hugging Face model, or for :mod:`specdef.architectures` models the
  manifest's ``model.architecture`` spec ``{"name", "kwargs"}`` (also in the weight files' header,
  :data:`ARCHITECTURE_KEY`, so the weights alone say how to build the model);
- ``specdef_manifest.json``: the defense config and report (per-layer shapes, singular values
  before/after, reconstruction errors, parameter counts), the defended structure used to rebuild
  the model, dtype, tied-weight aliases and provenance;
- the tokenizer files, when one is passed.

The manifest has one builder, :func:`build_manifest`, shared by :func:`save_defended` and the
streaming writer (and the native record one, :func:`native_record`).

Loading builds the base model from its config (a class of the ``transformers`` package itself —
no remote code), re-creates the :class:`~specdef.defense.layer.DefendedLinear` modules listed in the
manifest and loads the tensors with safetensors. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef.architectures import build_architecture
from specdef.defense.apply import DefenseReport
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import DefendedLinear, defended_layers, set_submodule
from specdef.errors import SpecdefError
from specdef.io import hf
from specdef.io.allowlist import strip_remote_code
from specdef.native.apply import PairRecord
from specdef.utils.dtypes import default_dtype
from specdef.utils.files import (
    atomic_directory,
    confined,
    file_sha256,
    write_json_atomic,
    write_text_atomic,
)
from specdef.utils.provenance import provenance

log = logging.getLogger(__name__)

MANIFEST = "specdef_manifest.json"
NATIVE_RECORD = "specdef_native.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
FORMAT = "specdef-checkpoint"
FORMAT_VERSION = 2  # 2: the manifest is bound to its weights and config (``integrity``)
DEFAULT_SHARD_BYTES = 2 * 1024**3
ARCHITECTURE_KEY = (
    "specdef_architecture"  # safetensors header: a specdef architecture's {name, kwargs}
)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter (float32 when there is none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _model_spec(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        return {"kind": "transformers", "class": type(model).__name__}
    arch = getattr(model, "specdef_architecture", None)
    if isinstance(arch, dict) and "name" in arch:
        return {"kind": "architecture", "architecture": arch}
    raise SpecdefError(
        f"Cannot save a {type(model).__name__}: specdef rebuilds Hugging Face models from their "
        "config and its own architectures from {name, kwargs}; build the model with "
        "specdef.architectures.build_architecture or pass architecture={'name': …, 'kwargs': …}."
    )


def structure(model: nn.Module) -> list[dict[str, Any]]:
    """The defended layers as the loader needs them: name, shape (m, n), bias, alpha, top_k, source."""
    return [
        {
            "name": name,
            "shape": [layer.out_features, layer.in_features],
            "bias": layer.compensation.bias is not None,
            "alpha": layer.alpha,
            "top_k": layer.top_k,
            "source": layer.source,
        }
        for name, layer in defended_layers(model).items()
    ]


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once; ``aliases[dropped] = kept``."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state, aliases


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def weights_metadata(
    layers: list[dict[str, Any]], *, architecture: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The safetensors header metadata of a release's weight files: the format, for a defended
    model what was defended (so the weights say it even without the manifest or config), and for a
    :mod:`specdef.architectures` model its ``{name, kwargs}`` under :data:`ARCHITECTURE_KEY` — what
    ``config.json`` is to a Hugging Face model, so the weights alone say how to build it (detection
    reads it; nothing about the defense is in it)."""
    meta = {"format": "pt"}
    if architecture is not None:
        meta[ARCHITECTURE_KEY] = json.dumps(dict(architecture), sort_keys=True)
    if layers:
        meta["specdef"] = json.dumps(
            {
                "mode": "algorithm1",
                "layers": len(layers),
                "alpha": sorted({float(layer["alpha"]) for layer in layers}),
                "top_k": sorted({int(layer["top_k"]) for layer in layers}),
            }
        )
    return meta


def _config_json(model: nn.Module) -> dict[str, Any]:
    """The model's full config, re-typed as a specdef config while it has defended layers, so stock
    transformers refuses it instead of loading random weights where the defended layers are."""
    config: Any = model.config
    return hf.config_json(config.to_dict(), structure(model), model_class=type(model).__name__)


def build_manifest(
    *,
    model: dict[str, Any],
    dtype: torch.dtype,
    structure: list[dict[str, Any]],
    report: DefenseReport | None,
    params: int,
    files: list[str],
    tensors: int,
    aliases: dict[str, str],
    extra: dict[str, Any] | None,
    streaming: bool,
) -> dict[str, Any]:
    """The ``specdef_manifest.json`` of an Algorithm 1 checkpoint — the one builder for the
    in-memory save and the streaming writer, so both record the same fields (``report`` carries
    the single ``forced`` rule of :meth:`DefenseReport.summarize`). How it was produced (in memory
    or streaming) is provenance, stored with the time and versions."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        "structure": structure,
        "defense": report.to_dict() if report is not None else None,
        "params": params,
        "weights": {"files": files, "tensors": tensors, "aliases": aliases},
        "extra": extra or {},
        "provenance": {**provenance(), "streaming": streaming},
    }


def native_record(
    config: SpecDefConfig,
    pairs: Sequence[PairRecord],
    *,
    model_output_gap: float | None,
    model_tolerance: float | None,
    extra: dict[str, Any] | None,
    streaming: bool,
) -> dict[str, Any]:
    """The ``specdef_native.json`` beside a native release (stock loaders ignore it), for the
    in-memory and the streaming path alike. ``forced``: a pair's product error, or the model's
    probe output gap, exceeds its tolerance (reachable only with ``config.force``)."""
    model_over = (
        model_output_gap is not None
        and model_tolerance is not None
        and model_output_gap > model_tolerance
    )
    return {
        "mode": "native",
        "config": config.to_dict(),
        "pairs": [pair.as_dict() for pair in pairs],
        "model_output_gap": model_output_gap,
        "forced": any(pair.over_tolerance for pair in pairs) or model_over,
        "extra": extra or {},
        "provenance": {**provenance(), "streaming": streaming},
    }


def save_defended(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    report: DefenseReport | None = None,
    tokenizer: Any | None = None,
    architecture: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra: dict[str, Any] | None = None,
    texts: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` (defended or not) to directory ``path`` atomically and return it.

    ``report`` defaults to ``model.specdef_report`` (set by ``apply_specdef_``); ``extra`` is
    stored verbatim in the manifest (e.g. the source model's name); ``texts`` are text files
    (name → content, e.g. the model card) written into the same atomic directory.
    """
    from safetensors.torch import save_file

    if architecture is not None:
        setattr(model, "specdef_architecture", dict(architecture))  # noqa: B010
    spec = _model_spec(model)
    report = report if report is not None else getattr(model, "specdef_report", None)
    state, aliases = _unique_state(model)
    shards = _shards(state, max_shard_bytes)
    dtype = model_dtype(model)
    metadata = weights_metadata(structure(model), architecture=spec.get("architecture"))
    with atomic_directory(path, overwrite=overwrite) as tmp:
        files: list[str] = []
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS), metadata=metadata)
            files.append(WEIGHTS)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=metadata)
                files.append(fname)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            write_json_atomic(
                tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        if spec["kind"] == "transformers":
            write_json_atomic(tmp / "config.json", _config_json(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (texts or {}).items():
            write_text_atomic(tmp / name, text)
        strip_remote_code(tmp)
        manifest = build_manifest(
            model=spec,
            dtype=dtype,
            structure=structure(model),
            report=report,
            params=sum(p.numel() for p in model.parameters()),
            files=files,
            tensors=len(state),
            aliases=aliases,
            extra=extra,
            streaming=False,
        )
        write_json_atomic(tmp / MANIFEST, bind_manifest(manifest, tmp))
    log.info("saved %s (%d tensors in %d file(s))", path, len(state), len(files))
    return Path(path)


def _canonical_sha256(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bind_manifest(
    manifest: dict[str, Any], directory: Path, *, known: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``manifest`` with an ``integrity`` block: the sha256 of every weight file it lists and of
    ``config.json`` (when present) in ``directory``, and of the manifest's own other fields — so a
    changed byte of a weight file or config, or any edited manifest field, is found on load.
    ``known``: digests of weight files already hashed as their bytes were written (streaming's
    shard records), used instead of reading those files again."""
    files = list(manifest.get("weights", {}).get("files") or [WEIGHTS])
    known = known or {}
    digests = {
        f: known.get(f) or file_sha256(confined(directory, f, what="weights file")) for f in files
    }
    if (directory / "config.json").is_file():
        digests["config.json"] = file_sha256(directory / "config.json")
    return {**manifest, "integrity": {"files": digests, "manifest": _canonical_sha256(manifest)}}


def check_integrity(manifest: Mapping[str, Any], directory: Path) -> None:
    """Refuse a checkpoint whose manifest does not match its files (see :func:`bind_manifest`);
    a format-1 manifest (made before binding existed) is accepted with a warning."""
    integrity = manifest.get("integrity")
    if integrity is None and manifest.get("format_version") == 1:
        log.warning("%s: a format-1 manifest is not bound to its weights; re-save it", directory)
        return
    if not isinstance(integrity, Mapping) or not isinstance(integrity.get("files"), Mapping):
        raise SpecdefError(
            f"The manifest of {str(directory)!r} has no integrity record; it was edited or is "
            "not from specdef — re-save the checkpoint."
        )
    if integrity.get("manifest") != _canonical_sha256(manifest):
        raise SpecdefError(
            f"The manifest of {str(directory)!r} was changed after it was written (its fields no "
            "longer match its integrity record); re-save the checkpoint instead of editing it."
        )
    for name, expected in integrity["files"].items():
        target = confined(directory, name, what="the manifest's integrity entry")
        if not target.is_file():
            raise SpecdefError(f"{str(target)!r} is missing; the checkpoint is incomplete.")
        found = file_sha256(target)
        if found != expected:
            raise SpecdefError(
                f"The manifest does not match the weights: {name} expected sha256 "
                f"{str(expected)[:16]}…, found {found[:16]}…; re-save the checkpoint."
            )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path`` (a :class:`SpecdefError` when absent/invalid)."""
    root = Path(path)
    if not root.is_dir():
        raise SpecdefError(
            f"Expected a checkpoint directory, found nothing at {str(root)!r}; pass the -o folder "
            "of `specdef defend`."
        )
    target = root / MANIFEST
    if not target.exists():
        raise SpecdefError(
            f"{str(root)!r} is not a specdef checkpoint: {MANIFEST} is missing; save it with "
            "specdef defend / save_defended."
        )
    try:
        manifest = json.loads(target.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecdefError(
            f"{str(target)!r} is not valid JSON ({err}); re-save the checkpoint."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SpecdefError(f"{str(target)!r} is not a {FORMAT} manifest; re-save the checkpoint.")
    check_integrity(manifest, root)  # an edited field is named as an edit first
    check_schema(manifest, where=str(target))  # then what a writer may have bound
    for fname in manifest.get("weights", {}).get("files", []):
        confined(root, fname, what=f"the manifest's weights.files entry {fname!r}")
    return manifest


def check_schema(manifest: Mapping[str, Any], *, where: str = "the manifest") -> None:
    """Refuse a manifest whose fields have the wrong types or ranges — before anything is built
    from it (a writer that binds a bad manifest is still refused; shapes are then checked against
    the safetensors headers by :func:`load_defended` on the meta device, before any allocation)."""

    def bad(what: str) -> SpecdefError:
        return SpecdefError(f"{where!r}: {what}; re-save the checkpoint with specdef.")

    model = manifest.get("model")
    if not isinstance(model, Mapping) or model.get("kind") not in ("transformers", "architecture"):
        raise bad("'model' must be an object whose kind is 'transformers' or 'architecture'")
    if model["kind"] == "transformers" and not isinstance(model.get("class"), str):
        raise bad("'model.class' must be a transformers class name")
    if model["kind"] == "architecture":
        arch = model.get("architecture")
        if not (
            isinstance(arch, Mapping)
            and isinstance(arch.get("name"), str)
            and isinstance(arch.get("kwargs", {}), Mapping)
        ):
            raise bad("'model.architecture' must be {name, kwargs}")
    if not isinstance(manifest.get("dtype", "float32"), str):
        raise bad("'dtype' must be a dtype name such as 'float32'")
    hf.check_structure(manifest.get("structure", []), bad)
    weights = manifest.get("weights", {})
    files = weights.get("files", []) if isinstance(weights, Mapping) else None
    aliases = weights.get("aliases", {}) if isinstance(weights, Mapping) else None
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise bad("'weights.files' must be a list of file names")
    if not (
        isinstance(aliases, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())
    ):
        raise bad("'weights.aliases' must map tensor names to tensor names")


def _build_base(root: Path, spec: dict[str, Any], attn_implementation: str | None) -> nn.Module:
    if spec.get("kind") == "transformers":
        import transformers

        cls = getattr(transformers, str(spec.get("class")), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise SpecdefError(
                f"Manifest names model class {spec.get('class')!r}, which is not a model class of "
                f"transformers {transformers.__version__}; only built-in classes are loaded."
            )
        if not (root / "config.json").exists():
            raise SpecdefError(f"{str(root)!r} has no config.json; re-save the checkpoint.")
        config = hf.read_config(root)
        if attn_implementation is not None:
            return cls._from_config(config, attn_implementation=attn_implementation)
        return cls(config)
    if spec.get("kind") == "architecture":
        arch = spec["architecture"]
        try:
            return build_architecture(arch["name"], **arch.get("kwargs", {}))
        except (TypeError, ValueError, RuntimeError) as err:
            if isinstance(err, SpecdefError):
                raise
            raise SpecdefError(
                f"The manifest's architecture {arch['name']!r} cannot be built from its kwargs "
                f"({str(err).splitlines()[0][:160]}); re-save the checkpoint."
            ) from None
    raise SpecdefError(f"Unknown model kind {spec.get('kind')!r} in the manifest.")


def _read_weights(root: Path, files: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for fname in files:
        target = confined(root, fname, what=f"the manifest's weights.files entry {fname!r}")
        if not target.exists():
            raise SpecdefError(
                f"Weights file {str(target)!r} is missing; the checkpoint is incomplete — re-save it."
            )
        try:
            state.update(load_file(str(target)))
        except (SafetensorError, OSError, ValueError) as err:
            raise SpecdefError(
                f"Weights file {str(target)!r} is truncated or corrupt ({str(err).splitlines()[0]}); "
                "re-save the checkpoint."
            ) from None
    return state


def load_defended(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Rebuild the model saved at ``path`` with its defended structure and load its weights.

    The returned model is in eval mode, in the saved dtype; its manifest is attached as
    ``model.specdef_manifest``. ``attn_implementation`` (Hugging Face models) is e.g. ``"eager"``,
    which double backward needs on CPU.
    """
    root = Path(path)
    manifest = read_manifest(root)  # schema and integrity checked
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise SpecdefError(f"Manifest dtype {manifest.get('dtype')!r} is not a torch dtype.")
    files = list(manifest.get("weights", {}).get("files", []))
    if not files:
        files = [WEIGHTS]
    state = _read_weights(root, files)  # bounded by the files' sizes
    with torch.device("meta"):  # shapes first: a lying manifest never allocates
        _check_against(root, _assemble(root, manifest, attn_implementation, dtype), state, manifest)
    model = _assemble(root, manifest, attn_implementation, dtype)
    aliases = dict(manifest.get("weights", {}).get("aliases", {}))
    for dropped, kept in aliases.items():
        if dropped in model.state_dict() and kept in state:
            state[dropped] = state[kept]  # re-tie even if the rebuilt model did not tie them
    model.load_state_dict(state, strict=False)
    if device is not None:
        model.to(device)
    model.eval()
    setattr(model, "specdef_manifest", manifest)  # noqa: B010
    return model


def _assemble(
    root: Path, manifest: Mapping[str, Any], attn_implementation: str | None, dtype: torch.dtype
) -> nn.Module:
    """The manifest's model with its defended structure, uninitialized (call under the meta device
    to check shapes without allocating)."""
    with default_dtype(
        dtype
    ):  # build in the checkpoint's dtype (a float32 build then cast loses bits)
        model = _build_base(root, manifest.get("model", {}), attn_implementation).to(dtype)
    for entry in manifest.get("structure", []):
        name = entry["name"]
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise SpecdefError(
                f"Manifest lists defended layer {name!r}, which the model does not have; the "
                "manifest does not match the model — re-save the checkpoint."
            ) from None
        m, n = entry["shape"]
        weight = getattr(original, "weight", None)
        expected = (m, n) if entry.get("source") != "conv1d" else (n, m)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            raise SpecdefError(
                f"Manifest shape {m}×{n} of layer {name!r} does not match the model's "
                f"{tuple(weight.shape) if weight is not None else 'missing weight'}; re-save it."
            )
        layer = DefendedLinear(
            n, m, bias=bool(entry["bias"]), alpha=float(entry["alpha"]), top_k=int(entry["top_k"]),
            source=str(entry.get("source", "linear")), dtype=dtype,
        )  # fmt: skip
        set_submodule(model, name, layer)
    return model


def _check_against(
    root: Path, model: nn.Module, state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]
) -> None:
    """Refuse weights whose names or shapes do not match the model the manifest describes."""
    aliases = dict(manifest.get("weights", {}).get("aliases", {}))
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state and k not in aliases]
    unexpected = [k for k in state if k not in wanted]
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (
            f"{'; ' if missing else ''}unexpected {unexpected[:3]}" if unexpected else ""
        )
        raise SpecdefError(
            f"The manifest does not match the weights in {str(root)!r}: {detail}; re-save the "
            "checkpoint with specdef (do not edit the manifest or tensors by hand)."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(wanted[key].shape):
            raise SpecdefError(
                f"Tensor {key!r} has shape {tuple(tensor.shape)} in the weights but "
                f"{tuple(wanted[key].shape)} in the rebuilt model; the manifest does not match."
            )


def load_tokenizer(path: str | os.PathLike[str]) -> Any | None:
    """The tokenizer saved beside the checkpoint, or ``None`` when there is none."""
    root = Path(path)
    if not any((root / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise SpecdefError(
            f"Cannot load the tokenizer in {str(root)!r} without remote code "
            f"({str(err).splitlines()[0][:160]}); specdef never runs code from a model directory."
        ) from None

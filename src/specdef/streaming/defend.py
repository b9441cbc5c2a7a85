"""Defend a (sharded) safetensors checkpoint one tensor at a time, never holding the model.

The source is a Hugging Face directory: ``config.json`` plus ``model.safetensors`` or shards with
``model.safetensors.index.json``. The model class named in the config is built on the ``meta``
device (no memory) only to find layers and symmetric pairs with the same selection rules as the
in-memory paths (:func:`specdef.defense.targets.select_targets`, :func:`specdef.native.pairs.find_symmetric_pairs`).
Every tensor is then read alone through a fresh ``safetensors.safe_open`` memory map (closed right
after, so resident pages do not accumulate), transformed in float64, cast back, and streamed into
an output shard whose header was written first (:class:`ShardWriter`), so neither a whole shard nor
the model is ever in memory; the next tensor is read while one is transformed and the writes run on
a background thread (:mod:`specdef.streaming.overlap`), so a bounded few tensors are held at once. Each layer goes through the same step as in-memory defense
(:func:`specdef.defense.step.defend_layer`, seeded per layer), and the manifest through the same
builder (:func:`specdef.io.checkpoint.build_manifest`), so a streamed release equals an in-memory
one tensor for tensor.

Output is staged in ``.<OUT>.partial/`` next to OUT and renamed into place at the end. A killed run
is resumable: rerunning with the same source and options skips every shard finished and verified
(sha256) and writes a result identical to an uninterrupted run's; other options are refused unless
``overwrite`` (see :mod:`specdef.streaming.resume`).

- ``mode="algorithm1"``: each selected ``X.weight`` becomes ``X.inflated.weight`` and
  ``X.compensation.weight`` (``X.bias`` → ``X.compensation.bias``) in the same shard, with a
  ``specdef_manifest.json`` that :func:`specdef.io.checkpoint.load_defended` reads.
- ``mode="native"``: same tensor names and shapes (a stock checkpoint); a first pass computes each
  pair's transform (per-head bases or a diagonal, a few KB) and checks precision, the second
  rewrites the tensors.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef.defense import guard
from specdef.defense.apply import DefenseReport
from specdef.defense.config import SpecDefConfig
from specdef.defense.layer import count_parameters
from specdef.defense.step import LayerReport, defend_layer
from specdef.defense.targets import select_targets
from specdef.errors import SpecdefError
from specdef.io import card, hf
from specdef.io.allowlist import Skipped, release_files, strip_remote_code
from specdef.io.checkpoint import (
    MANIFEST,
    NATIVE_RECORD,
    bind_manifest,
    build_manifest,
    native_record,
    weights_metadata,
)
from specdef.native.apply import PairRecord, check_native_config
from specdef.native.pairs import select_pairs
from specdef.streaming.native import run_native
from specdef.streaming.resume import Staging, staged_directory
from specdef.streaming.shards import (
    SAFETENSORS_DTYPES,
    Checkpoint,
    Item,
    check_shapes,
    open_checkpoint,
    write_shards,
)
from specdef.utils.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

MODES = ("algorithm1", "native")


@dataclass(frozen=True)
class StreamingResult:
    """What a streaming run read, wrote and changed: ``report`` (Algorithm 1) or ``pairs``
    (native), as the in-memory paths return them."""

    path: Path
    mode: str
    bytes_in: int
    bytes_out: int
    tensors_in: int
    tensors_out: int
    seconds: float
    report: DefenseReport | None = None
    pairs: tuple[PairRecord, ...] = ()
    resumed_shards: tuple[str, ...] = ()  # finished by an earlier, killed run; verified, not redone
    not_copied: tuple[Skipped, ...] = ()  # source files the allowlist left behind


def _meta_model(root: Path) -> nn.Module:
    import transformers

    config = hf.read_config(root)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SpecdefError(
            f"config.json names architectures {names!r}; streaming needs a model class of "
            f"transformers {transformers.__version__} there (no remote code)."
        )
    with torch.device("meta"):
        return cls(config)


# --------------------------------------------------------------------------- the run


def defend_streaming(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: SpecDefConfig,
    *,
    mode: str = "algorithm1",
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> StreamingResult:
    """Defend the checkpoint at ``src`` into ``out`` with ``config``, without loading it (see the
    module docstring); ``extra`` is stored verbatim in the manifest / native record.

    ``config.targets``: for ``"algorithm1"`` the rules of
    :func:`specdef.defense.targets.select_targets`; for ``"native"`` those of
    :func:`specdef.native.pairs.select_pairs`. The precision guard is the in-memory one (each
    layer's reconstruction error, each pair's product error, in the stored dtype, against
    ``config.tolerance_for``); there is no probe batch, since the model is never built.
    Prefer :func:`specdef.release.defend.defend`, which every mode shares.

    Resumable: a run killed part-way leaves ``.<OUT name>.partial/`` next to ``out``; calling again
    with the same arguments skips the shards it finished (after checking their sha256). With other
    arguments it raises :class:`SpecdefError`, unless ``overwrite``, which discards it and starts
    over (and replaces an existing ``out``).
    """
    if mode not in MODES:
        raise SpecdefError(f"Unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
    if mode == "native":
        check_native_config(config)
    start = time.perf_counter()
    source = open_checkpoint(src)
    model = _meta_model(source.root)
    # a lying header would otherwise write a checkpoint that never loads
    check_shapes(source, model)
    options = {
        "mode": mode,
        "config": config.to_dict(),
        "source": str(source.root.resolve()),
        "files": {
            f: [(source.root / f).stat().st_size, (source.root / f).stat().st_mtime_ns]
            for f in source.files
        },
    }
    report: DefenseReport | None = None
    pairs: tuple[PairRecord, ...] = ()
    with staged_directory(out, options, overwrite=overwrite) as staging:
        tmp = staging.out
        if mode == "algorithm1":
            report, manifest = _run_algorithm1(source, model, staging, config, extra)
            tensors_out = int(manifest["weights"]["tensors"])
        else:
            selected = select_pairs(model, config.targets, exclude=config.exclude)
            pairs = tuple(run_native(source, selected, staging, config))
            record = native_record(
                config, pairs, model_output_gap=None, model_tolerance=None, extra=extra,
                streaming=True,
            )  # fmt: skip
            write_json_atomic(tmp / NATIVE_RECORD, record)
            tensors_out = len(source.specs)
        copied, skipped = release_files(source.root)
        for item in copied:  # config, tokenizer, generation config, licence — the allowlist
            shutil.copy2(item, tmp / item.name)
        strip_remote_code(tmp)
        dtype = _model_dtype(source, model)
        dtype_name = str(dtype).removeprefix("torch.")
        if mode == "algorithm1":
            _retype_config(tmp, manifest)
            facts = card.facts_from_defense(
                manifest["defense"], source=str(src), dtype=dtype_name,
                tolerance=config.tolerance_for(dtype),
            )  # fmt: skip
        else:
            facts = card.facts_from_native(
                record, source=str(src), dtype=dtype_name, params=count_parameters(model),
                tolerance=config.tolerance_for(dtype),
            )  # fmt: skip
        write_text_atomic(tmp / card.CARD, card.model_card(facts))
        if mode == "algorithm1":  # last: bound to the final config.json and shards
            # the shards' digests from their records: hashed on the way out, not read again
            bound = bind_manifest(manifest, tmp, known=staging.digests())
            write_json_atomic(tmp / MANIFEST, bound)
        bytes_out = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        resumed = tuple(staging.resumed)
    return StreamingResult(
        path=Path(out),
        mode=mode,
        bytes_in=sum((source.root / f).stat().st_size for f in source.files),
        bytes_out=bytes_out,
        tensors_in=len(source.specs),
        tensors_out=tensors_out,
        seconds=time.perf_counter() - start,
        report=report,
        pairs=pairs,
        resumed_shards=resumed,
        not_copied=tuple(skipped),
    )


def _aliases(model: nn.Module, present: set[str]) -> dict[str, str]:
    """Tied parameters the checkpoint stores once: ``{missing name: stored name}``."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    out = {}
    for names in groups.values():
        kept = [n for n in names if n in present]
        out.update({n: kept[0] for n in names if n not in present and kept})
    return out


def _retype_config(out: Path, manifest: dict[str, Any]) -> None:
    """Rewrite the copied ``config.json`` as a specdef config (:func:`specdef.io.hf.config_json`),
    as the in-memory save writes it, so stock loaders refuse it without specdef."""
    target = out / "config.json"
    try:
        base = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SpecdefError(f"Cannot read the source's config.json ({err}); repair it.") from None
    if not isinstance(base, dict):
        raise SpecdefError("The source's config.json is not a JSON object; repair it.")
    retyped = hf.config_json(
        base, manifest["structure"], model_class=str(manifest["model"].get("class", ""))
    )
    write_json_atomic(target, retyped)


def _model_dtype(source: Checkpoint, model: nn.Module) -> torch.dtype:
    """The stored dtype of the model's first floating parameter (the in-memory rule,
    :func:`specdef.io.checkpoint.model_dtype`, read from the checkpoint header)."""
    for name, _ in model.named_parameters():
        if name in source.specs and SAFETENSORS_DTYPES[source.specs[name][0]].is_floating_point:
            return SAFETENSORS_DTYPES[source.specs[name][0]]
    return torch.float32


@dataclass(frozen=True)
class _Layer:
    name: str
    key: str
    conv: bool
    shape: tuple[int, int]  # (m, n) in Linear form
    bias: bool


def _renamed(layer: str, new: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    guard.check_finite(layer, "bias", tensor)
    return {new: tensor}


def _defend_layer(
    layer: _Layer, config: SpecDefConfig, reports: list[dict[str, Any]], raw: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Algorithm 1 on one weight as read from disk: ``{inflated, compensation}`` in its dtype."""
    weight = raw.T if layer.conv else raw
    step = defend_layer(
        layer.name, weight, config, bias=layer.bias, source="conv1d" if layer.conv else "linear"
    )
    rep = step.report
    if rep.over_tolerance and not config.force:
        raise guard.layer_refusal(
            layer.name, weight, step.basis, reconstruction_error=rep.reconstruction_error,
            output_gap=rep.output_gap, tolerance=rep.tolerance, alpha=config.alpha,
        )  # fmt: skip
    reports.append(rep.to_dict())
    return {
        f"{layer.name}.inflated.weight": step.inflated,
        f"{layer.name}.compensation.weight": step.compensation,
    }


def _run_algorithm1(
    source: Checkpoint,
    model: nn.Module,
    staging: Staging,
    config: SpecDefConfig,
    extra: dict[str, Any] | None,
) -> tuple[DefenseReport, dict[str, Any]]:
    names = select_targets(
        model, config.targets, exclude=config.exclude, n_random=config.n_random, seed=config.seed
    )
    guard.check_untied(model, names)
    reports: list[dict[str, Any]] = []
    items: dict[str, Item] = {}
    added = 0
    for name in names:
        key = f"{name}.weight"
        if key not in source.specs:
            raise SpecdefError(
                f"Layer {name!r} has no tensor {key!r} in the checkpoint (tied or renamed "
                "weights cannot be streamed); exclude it with --exclude."
            )
        code, shape = source.specs[key]
        conv = type(model.get_submodule(name)).__name__ == "Conv1D"
        m, n = (shape[1], shape[0]) if conv else shape
        guard.check_rank(name, (m, n), top_k=config.top_k)
        bias_key = f"{name}.bias"
        has_bias = bias_key in source.specs
        layer = _Layer(name, key, conv, (m, n), has_bias)
        items[key] = Item(
            key,
            [
                (f"{name}.inflated.weight", code, (m, n)),
                (f"{name}.compensation.weight", code, (m, m)),
            ],
            functools.partial(_defend_layer, layer, config, reports),
        )
        if has_bias:
            new = f"{name}.compensation.bias"
            items[bias_key] = Item(
                bias_key,
                [(new, *source.specs[bias_key])],
                functools.partial(_renamed, name, new),
            )
        added += m * m
    described = [{"alpha": config.alpha, "top_k": config.top_k}] * len(names)
    tensors, dicts = write_shards(
        source, staging, items, reports=reports, metadata=weights_metadata(described)
    )
    # shards are written in file order; report the layers in selection order, as in memory
    by_name = {d["name"]: LayerReport.from_dict(d) for d in dicts}
    params_before = count_parameters(model)
    report = DefenseReport.summarize(
        config,
        [by_name[name] for name in names],
        params_before=params_before,
        params_after=params_before + added,
    )
    # the loader's structure lists layers in module order (what io.checkpoint.structure reads)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    structure = [
        {
            "name": name,
            "shape": list(by_name[name].shape),
            "bias": by_name[name].bias,
            "alpha": config.alpha,
            "top_k": config.top_k,
            "source": by_name[name].source,
        }
        for name in sorted(names, key=order.__getitem__)
    ]
    manifest = build_manifest(
        model={"kind": "transformers", "class": type(model).__name__},
        dtype=_model_dtype(source, model),
        structure=structure,
        report=report,
        params=params_before + added,
        files=list(source.files),
        tensors=tensors,
        aliases=_aliases(model, set(source.specs)),
        extra=extra,
        streaming=True,
    )
    return report, manifest

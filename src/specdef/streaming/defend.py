"""Defend a (sharded) safetensors checkpoint one tensor at a time, never holding the model.

The source is a Hugging Face directory: ``config.json`` plus ``model.safetensors`` or shards with
``model.safetensors.index.json``. The model class named in the config is built on the ``meta``
device (no memory) only to find layers and symmetric pairs with the same selection rules as the
in-memory paths (:func:`specdef.defense.targets.select_targets`, :func:`specdef.native.pairs.find_symmetric_pairs`).
Every tensor is then read alone through a fresh ``safetensors.safe_open`` memory map (closed right
after, so resident pages do not accumulate), transformed in float64, cast back, and streamed into
an output shard whose header was written first (:class:`ShardWriter`), so neither a whole shard nor
the model is ever in memory. The randomized top-k path is the default, seeded per tensor.

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
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdef.defense.apply import DefenseReport, LayerReport
from specdef.defense.config import SpecDefConfig
from specdef.defense.targets import select_targets
from specdef.errors import SpecdefError
from specdef.io.checkpoint import FORMAT, FORMAT_VERSION, INDEX, MANIFEST
from specdef.linalg.spectral import deform_with_basis, top_subspace
from specdef.native.pairs import select_pairs
from specdef.streaming import shards as sio
from specdef.streaming.native import run_native
from specdef.streaming.resume import Staging, staged_directory, tensor_seed
from specdef.streaming.shards import DTYPES, Item, Source, open_source, write_shards
from specdef.utils.files import write_json_atomic
from specdef.utils.provenance import provenance

log = logging.getLogger(__name__)

MODES = ("algorithm1", "native")
NATIVE_RECORD = "specdef_native.json"


@dataclass(frozen=True)
class StreamingResult:
    """What a streaming run read, wrote and changed."""

    path: Path
    mode: str
    bytes_in: int
    bytes_out: int
    tensors_in: int
    tensors_out: int
    seconds: float
    layers: tuple[dict[str, Any], ...] = field(default=())
    resumed_shards: tuple[str, ...] = ()  # finished by an earlier, killed run; verified, not redone


def _meta_model(root: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False)
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
    *,
    mode: str = "algorithm1",
    alpha: float,
    top_k: int,
    targets: str | tuple[str, ...] | None = None,
    exclude: str | tuple[str, ...] = (),
    method: str = "randomized",
    seed: int = 0,
    tolerance: float | None = None,
    force: bool = False,
    overwrite: bool = False,
    probe_columns: int = 8,
) -> StreamingResult:
    """Defend the checkpoint at ``src`` into ``out`` without loading it (see the module docstring).

    ``targets``: for ``"algorithm1"`` the rules of :func:`specdef.defense.targets.select_targets` (default
    ``"all-linear"``); for ``"native"`` those of :func:`specdef.native.pairs.select_pairs` (default every
    pair). The precision guard estimates the relative error in the stored dtype with
    ``probe_columns`` Gaussian probes (‖(C·W̃ − W)Ω‖/‖WΩ‖, cost O(m·n·probe_columns) instead of
    a full m×m×n product) and refuses above ``tolerance`` unless ``force``.

    Resumable: a run killed part-way leaves ``.<OUT name>.partial/`` next to ``out``; calling again
    with the same arguments skips the shards it finished (after checking their sha256). With other
    arguments it raises :class:`SpecdefError`, unless ``overwrite``, which discards it and starts
    over (and replaces an existing ``out``).
    """
    if mode not in MODES:
        raise SpecdefError(f"Unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
    config = SpecDefConfig(
        alpha=alpha,
        top_k=top_k,
        targets=targets if targets is not None else "all-linear",
        exclude=exclude,
        method=method,
        seed=seed,
        tolerance=tolerance,
        force=force,
    )
    start = time.perf_counter()
    source = open_source(src)
    model = _meta_model(source.root)
    options = {
        "mode": mode,
        "config": config.to_dict(),
        "probe_columns": probe_columns,
        "source": str(source.root.resolve()),
        "files": {
            f: [(source.root / f).stat().st_size, (source.root / f).stat().st_mtime_ns]
            for f in source.files
        },
    }
    with staged_directory(out, options, overwrite=overwrite) as staging:
        tmp = staging.out
        if mode == "algorithm1":
            layers, manifest = _run_algorithm1(source, model, staging, config, probe_columns)
            write_json_atomic(tmp / MANIFEST, manifest)
            tensors_out = int(manifest["weights"]["tensors"])
        else:
            pairs = select_pairs(model, targets, exclude=exclude)
            layers = run_native(source, pairs, staging, config)
            record = {"mode": "native", "config": config.to_dict(), "pairs": layers}
            write_json_atomic(tmp / NATIVE_RECORD, {**record, "provenance": provenance()})
            tensors_out = len(source.specs)
        skip = (INDEX, MANIFEST, NATIVE_RECORD)
        for item in source.root.iterdir():  # config, tokenizer, generation config …
            if item.is_file() and not item.name.endswith(".safetensors") and item.name not in skip:
                shutil.copy2(item, tmp / item.name)
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
        layers=tuple(layers),
        resumed_shards=resumed,
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


def _float_dtype(source: Source) -> torch.dtype:
    codes = [c for c, _ in source.specs.values() if DTYPES[c].is_floating_point]
    return DTYPES[codes[0]] if codes else torch.float32


def _probe_error(
    weight: torch.Tensor, inflated: torch.Tensor, compensation: torch.Tensor, columns: int
) -> float:
    """‖(C·W̃ − W)Ω‖/‖WΩ‖ for a Gaussian Ω (n×columns): the stored-dtype error, cheaply."""
    omega = torch.randn(
        weight.shape[1], columns, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)
    )
    ref = weight @ omega
    got = compensation.to(torch.float64) @ (inflated.to(torch.float64) @ omega)  # no-op for f64
    if not bool(torch.isfinite(got).all()):
        return math.inf
    return float(
        torch.linalg.matrix_norm(got - ref) / torch.linalg.matrix_norm(ref).clamp_min(1e-300)
    )


@dataclass(frozen=True)
class _Layer:
    name: str
    key: str
    conv: bool
    shape: tuple[int, int]  # (m, n) in Linear form
    dtype: torch.dtype
    bias: bool


def _renamed(source: Source, key: str, new: str) -> dict[str, torch.Tensor]:
    return {new: sio.read_tensor(source, key)}


def _defend_layer(
    source: Source,
    layer: _Layer,
    config: SpecDefConfig,
    probe_columns: int,
    reports: list[dict[str, Any]],
) -> dict[str, torch.Tensor]:
    """Algorithm 1 on one weight read from disk: ``{inflated, compensation}`` in its dtype."""
    raw = sio.read_tensor(source, layer.key)
    weight = (raw.T if layer.conv else raw).to(torch.float64)
    del raw
    generator = torch.Generator().manual_seed(tensor_seed(config.seed, layer.name))
    basis = top_subspace(weight, config.top_k, method=config.method, generator=generator)
    inflated, compensation = deform_with_basis(weight, config.alpha, basis)
    inflated, compensation = inflated.to(layer.dtype), compensation.to(layer.dtype)
    stored = inflated.to(torch.float64)  # the rounded W̃, cast once for the checks below
    error = _probe_error(weight, stored, compensation, probe_columns)
    bound = config.tolerance_for(layer.dtype)
    short = str(layer.dtype).removeprefix("torch.")
    if error > bound and not config.force:
        raise SpecdefError(
            f"Layer {layer.name!r}: relative reconstruction error ≈{error:.2e} in {short} at "
            f"alpha={config.alpha:g} is above the tolerance {bound:.3g}; lower --alpha, store in a "
            "wider dtype, raise --tolerance, or pass --force."
        )
    m, n = layer.shape
    bias = m if layer.bias else 0
    # singular values on the top-k subspace: exact for an exact basis, no full SVD of a big matrix
    reports.append(
        LayerReport(
            name=layer.name,
            source="conv1d" if layer.conv else "linear",
            shape=(m, n),
            dtype=short,
            bias=layer.bias,
            sigma_before=tuple(torch.linalg.svdvals(basis.T @ weight).tolist()),
            sigma_after=tuple(torch.linalg.svdvals(basis.T @ stored).tolist()),
            fro_before=float(torch.linalg.matrix_norm(weight)),
            fro_after=float(torch.linalg.matrix_norm(stored)),
            reconstruction_error=error,
            output_gap=None,
            tolerance=bound,
            params_before=m * n + bias,
            params_after=m * n + m * m + bias,
        ).to_dict()
    )
    return {
        f"{layer.name}.inflated.weight": inflated,
        f"{layer.name}.compensation.weight": compensation,
    }


def _run_algorithm1(
    source: Source,
    model: nn.Module,
    staging: Staging,
    config: SpecDefConfig,
    probe_columns: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    names = select_targets(model, config.targets, exclude=config.exclude)
    reports: list[dict[str, Any]] = []
    items: dict[str, Item] = {}
    structure = []
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
        if not 1 <= config.top_k <= min(m, n):
            raise SpecdefError(
                f"{name}: top_k must be in [1, {min(m, n)}] for a {m}×{n} weight, found "
                f"{config.top_k}; choose a smaller --top-k or exclude this layer."
            )
        bias_key = f"{name}.bias"
        has_bias = bias_key in source.specs
        layer = _Layer(name, key, conv, (m, n), DTYPES[code], has_bias)
        items[key] = Item(
            key,
            [
                (f"{name}.inflated.weight", code, (m, n)),
                (f"{name}.compensation.weight", code, (m, m)),
            ],
            functools.partial(_defend_layer, source, layer, config, probe_columns, reports),
        )
        if has_bias:
            new = f"{name}.compensation.bias"
            items[bias_key] = Item(
                bias_key,
                [(new, *source.specs[bias_key])],
                functools.partial(_renamed, source, bias_key, new),
            )
        structure.append(
            {
                "name": name,
                "shape": [m, n],
                "bias": has_bias,
                "alpha": config.alpha,
                "top_k": config.top_k,
                "source": "conv1d" if conv else "linear",
            }
        )
        added += m * m
    tensors, dicts = write_shards(source, staging, items, reports=reports)
    layer_reports = tuple(_layer_report(d) for d in dicts)
    params_before = sum(
        math.prod(s) for c, s in source.specs.values() if DTYPES[c].is_floating_point
    )
    forced = tuple(r.name for r in layer_reports if r.reconstruction_error > r.tolerance)
    report = DefenseReport(
        config, layer_reports, params_before, params_before + added, None, bool(forced), forced
    )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"kind": "transformers", "class": type(model).__name__},
        "dtype": str(_float_dtype(source)).removeprefix("torch."),
        "structure": structure,
        "defense": report.to_dict(),
        "params": params_before + added,
        "weights": {
            "files": list(source.files),
            "tensors": tensors,
            "aliases": _aliases(model, set(source.specs)),
        },
        "extra": {"streaming": True, "source": str(source.root)},
        "provenance": provenance(),
    }
    return [r.to_dict() for r in layer_reports], manifest


def _layer_report(data: dict[str, Any]) -> LayerReport:
    """A :class:`LayerReport` back from its ``to_dict`` (as stored in a shard's record)."""
    tuples = ("shape", "sigma_before", "sigma_after")
    return LayerReport(**{k: tuple(v) if k in tuples else v for k, v in data.items()})  # type: ignore[arg-type]

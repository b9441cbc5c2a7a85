"""Defend workflows: load a source, defend it and save the release atomically — Algorithm 1
(:func:`defend_to`) and native deformation (:func:`defend_native_to`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from specdef.defense.apply import DefenseReport, apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.cost import forward_latency, inference_cost
from specdef.defense.layer import count_parameters
from specdef.errors import SpecdefError
from specdef.io.checkpoint import (
    save_defended,
)
from specdef.native.apply import PairRecord, apply_native_
from specdef.release.sources import check_finite, load_source, parse_dtype, probe_batch
from specdef.utils.files import atomic_directory, preflight_output, write_json_atomic
from specdef.utils.provenance import provenance


def defend_to(
    src: str,
    out: str | os.PathLike[str],
    config: SpecDefConfig,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> DefenseReport:
    """Load ``src``, defend it with ``config`` (precision guard on a probe batch) and save it to
    ``out`` atomically. Nothing is written when any step fails."""
    preflight_output(out, overwrite=overwrite)
    source = load_source(src, dtype=parse_dtype(dtype))
    check_finite(source.model)
    batch = probe_batch(source.model, source.tokenizer, seed=seed)
    params_before, latency_before = (
        count_parameters(source.model),
        forward_latency(source.model, batch),
    )
    report = apply_specdef_(source.model, config, probe=batch)
    cost = inference_cost(
        source.model, batch, params_before=params_before, latency_before_s=latency_before
    )
    report = dataclasses.replace(report, inference_cost=cost)
    save_defended(
        source.model,
        out,
        report=report,
        tokenizer=source.tokenizer,
        overwrite=overwrite,
        extra={"source": src, "source_kind": source.kind},
    )
    return report


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
    :func:`specdef.io.checkpoint.save_defended` (their state-dict names are unchanged)."""

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

"""The one defend pipeline: a :class:`DefendRequest` (what to defend, where to, how) and
:func:`defend`, which every mode shares — Algorithm 1 or native, in memory or streaming.

Whatever the path, a layer goes through :func:`specdef.defense.step.defend_layer` (a pair through
:func:`specdef.native.apply.pair_record`), is held to the tolerance table of
:mod:`specdef.defense.guard`, and the release is described by the manifest builders of
:mod:`specdef.io.checkpoint`; so the same request defended in memory and by streaming writes the
same tensors and the same manifest (up to provenance).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from specdef.defense import guard
from specdef.defense import probe as probing
from specdef.defense.apply import DefenseReport, apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.defense.cost import forward_latency, inference_cost
from specdef.defense.layer import count_parameters
from specdef.errors import SpecdefError
from specdef.io import card
from specdef.io.allowlist import Skipped, release_files, strip_remote_code
from specdef.io.checkpoint import NATIVE_RECORD, model_dtype, native_record, save_defended
from specdef.native.apply import PairRecord, apply_native_
from specdef.release.sources import Source, load_source, probe_batch
from specdef.streaming.defend import MODES, defend_streaming
from specdef.utils.dtypes import parse_dtype
from specdef.utils.files import (
    atomic_directory,
    preflight_output,
    write_json_atomic,
    write_text_atomic,
)


@dataclass(frozen=True)
class DefendRequest:
    """One defense, whatever the path. α, top-k, targets, method, seed, tolerance and force live
    in ``config`` and are validated there, once.

    source: a Hugging Face model directory, a specdef checkpoint or a zoo model name; with
        ``streaming``, a Hugging Face safetensors directory.
    output: the directory to write (atomically; never half-written).
    config: what to defend and how (:class:`specdef.defense.config.SpecDefConfig`). Its
        ``method`` defaults to ``"exact"`` on every path; pass ``"randomized"`` for the
        O(m·n·k) range finder (in memory and streaming alike).
    mode: ``"algorithm1"`` (inflated + compensation layers, the paper) or ``"native"`` (fold the
        compensation into the model's own symmetric layers; same architecture).
    streaming: defend tensor by tensor without loading the model (resumable; keeps the source
        dtype, so ``dtype`` must be None, and runs no probe batch, so ``probe`` must be False).
    dtype: store and run the model in this dtype (``float32`` …); None keeps the source's.
    overwrite: replace an existing output (streaming: also discard a killed run's partial output
        made with other options).
    probe: also measure the model's output on a fixed probe batch — each layer's and the model's
        output gap (Algorithm 1), the model's output gap (native) — and refuse above the
        tolerance unless ``config.force``. Needs the model in memory.
    probe_seed: seeds the probe batch's random token ids or inputs (the probe text needs none).
    device: where the model is defended and probed (``"auto"``, ``"cpu"``, ``"cuda:0"`` …; None:
        the CPU); the checkpoint is written from there, so it loads on any device.
    """

    source: str
    output: str | os.PathLike[str]
    config: SpecDefConfig
    mode: str = "algorithm1"
    streaming: bool = False
    dtype: str | None = None
    overwrite: bool = False
    probe: bool = True
    probe_seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecdefError(f"Unknown mode {self.mode!r}; expected one of {', '.join(MODES)}.")
        parse_dtype(self.dtype)
        if self.streaming and self.dtype is not None:
            raise SpecdefError(
                f"streaming keeps the source dtype, found dtype={self.dtype!r}; drop --dtype or "
                "defend in memory."
            )
        _check_apart(self.source, self.output)
        if self.streaming and self.probe:
            raise SpecdefError(
                "streaming never builds the model, so it cannot run the probe batch; pass "
                "probe=False (the CLI does with --streaming) or defend in memory."
            )


def _check_apart(source: str, output: str | os.PathLike[str]) -> None:
    """Refuse an output that is the source directory, lies inside it or contains it — with or
    without overwrite, writing there would destroy the model being defended (or defend itself)."""
    src = Path(source)
    if not src.exists():
        return  # a zoo name
    src, out = src.resolve(), Path(output).resolve()
    if out == src or src in out.parents or out in src.parents:
        where = "is" if out == src else "lies inside" if src in out.parents else "contains"
        raise SpecdefError(
            f"The output {str(output)!r} {where} the source {source!r}; choose an -o outside "
            "the source directory (overwrite never applies to the source)."
        )


@dataclass(frozen=True)
class DefendResult:
    """What :func:`defend` did: ``report`` (Algorithm 1) or ``pairs`` (native), and for streaming
    the bytes moved and the shards an earlier killed run had finished."""

    request: DefendRequest
    output: Path
    seconds: float
    report: DefenseReport | None = None
    pairs: tuple[PairRecord, ...] = ()
    model_output_gap: float | None = None  # native: the probe batch's relative output gap
    bytes_in: int | None = None
    bytes_out: int | None = None
    resumed_shards: tuple[str, ...] = ()
    not_copied: tuple[Skipped, ...] = ()  # source files the release allowlist left behind

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "out": str(self.output),
            "mode": self.request.mode,
            "streaming": self.request.streaming,
            "seconds": self.seconds,
        }
        if self.report is not None:
            out.update(self.report.to_dict())
        else:
            out["config"] = self.request.config.to_dict()
            out["pairs"] = [pair.as_dict() for pair in self.pairs]
            out["model_output_gap"] = self.model_output_gap
        out["not_copied"] = [{"file": s.name, "reason": s.reason} for s in self.not_copied]
        if self.request.streaming:
            out.update(
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                resumed_shards=list(self.resumed_shards),
            )
        return out


def defend(request: DefendRequest) -> DefendResult:
    """Defend ``request.source`` into ``request.output`` (see :class:`DefendRequest`). Nothing is
    written when any step fails (streaming: a resumable staging dir beside the output)."""
    start = time.perf_counter()
    if request.streaming:
        streamed = defend_streaming(
            request.source,
            request.output,
            request.config,
            mode=request.mode,
            overwrite=request.overwrite,
            extra={"source": request.source, "source_kind": "transformers-dir"},
        )
        return DefendResult(
            request=request, output=Path(request.output), seconds=time.perf_counter() - start,
            report=streamed.report, pairs=streamed.pairs, bytes_in=streamed.bytes_in,
            bytes_out=streamed.bytes_out, resumed_shards=streamed.resumed_shards,
            not_copied=streamed.not_copied,
        )  # fmt: skip
    preflight_output(request.output, overwrite=request.overwrite)
    source = load_source(request.source, dtype=parse_dtype(request.dtype), device=request.device)
    batch = (
        probe_batch(source.model, source.tokenizer, seed=request.probe_seed)
        if request.probe
        else None
    )
    extra = {"source": request.source, "source_kind": source.kind}
    # in memory, only what save_pretrained / the tokenizer write is released; name the rest
    not_copied = tuple(release_files(request.source)[1]) if source.kind != "zoo" else ()
    dtype = model_dtype(source.model)
    dtype_name = str(dtype).removeprefix("torch.")
    if request.mode == "algorithm1":
        params_before = count_parameters(source.model)
        latency_before = forward_latency(source.model, batch) if batch is not None else None
        report = apply_specdef_(source.model, request.config, probe=batch)
        if batch is not None and latency_before is not None:
            cost = inference_cost(
                source.model, batch, params_before=params_before, latency_before_s=latency_before
            )
            report = dataclasses.replace(report, inference_cost=cost)
        facts = card.facts_from_defense(
            report.to_dict(), source=request.source, dtype=dtype_name,
            tolerance=request.config.tolerance_for(dtype),
        )  # fmt: skip
        save_defended(
            source.model, request.output, report=report, tokenizer=source.tokenizer,
            overwrite=request.overwrite, extra=extra, texts={card.CARD: card.model_card(facts)},
        )  # fmt: skip
        return DefendResult(
            request=request, output=Path(request.output), seconds=time.perf_counter() - start,
            report=report, not_copied=not_copied,
        )  # fmt: skip
    params = sum(p.numel() for p in source.model.parameters())
    pairs, gap, tolerance = _native_in_memory(source, request.config, batch)
    record = native_record(
        request.config, pairs, model_output_gap=gap, model_tolerance=tolerance, extra=extra,
        streaming=False,
    )  # fmt: skip
    facts = card.facts_from_native(
        record, source=request.source, dtype=dtype_name, params=params,
        tolerance=request.config.tolerance_for(dtype),
    )  # fmt: skip
    _save_native(source, request, record, card.model_card(facts))
    return DefendResult(
        request=request, output=Path(request.output), seconds=time.perf_counter() - start,
        pairs=tuple(pairs), model_output_gap=gap, not_copied=not_copied,
    )  # fmt: skip


def _native_in_memory(
    source: Source, config: SpecDefConfig, batch: probing.Probe | None
) -> tuple[list[PairRecord], float | None, float | None]:
    """Native deformation of the loaded model, and (with a probe batch) the model's output gap
    and its tolerance, refused above it unless ``config.force`` (nothing is written yet)."""
    if getattr(source.model, "specdef_manifest", None) is not None:
        raise SpecdefError(
            f"{source.name!r} is already a specdef (Algorithm 1) checkpoint; native mode needs "
            "the undefended model."
        )
    reference = probing.model_output(source.model, batch) if batch is not None else None
    pairs = apply_native_(source.model, config)
    if reference is None or batch is None:
        return pairs, None, None
    gap = probing.relative_gap(probing.model_output(source.model, batch), reference)
    tolerance = config.tolerance_for(reference.dtype)
    if gap > tolerance and not config.force:
        worst = max(pairs, key=lambda p: p.product_error / p.tolerance)
        raise guard.model_gap_refusal(
            gap, tolerance=tolerance, dtype=reference.dtype, alpha=config.alpha,
            worst_layer=worst.pair, worst_error=worst.product_error,
        )  # fmt: skip
    return pairs, gap, tolerance


def _save_native(
    source: Source, request: DefendRequest, record: dict[str, Any], model_card: str
) -> None:
    """Save a native release: ``save_pretrained`` (plus tokenizer and the native record, which
    stock loaders ignore); a model without ``save_pretrained`` through
    :func:`specdef.io.checkpoint.save_defended` (its state-dict names are unchanged)."""
    model: nn.Module = source.model
    save_pretrained = getattr(model, "save_pretrained", None)
    if not callable(save_pretrained):
        save_defended(
            model, request.output, overwrite=request.overwrite, extra={"native": record},
            texts={card.CARD: model_card},
        )  # fmt: skip
        return
    with atomic_directory(request.output, overwrite=request.overwrite) as tmp:
        save_pretrained(str(tmp))
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / NATIVE_RECORD, record)
        write_text_atomic(tmp / card.CARD, model_card)
        strip_remote_code(tmp)

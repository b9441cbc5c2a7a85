"""Defend a source with any registered defense into an output directory the rest of specdef loads
(``attack``, ``curvature``, ``verify``, ``inspect``): :class:`DefenseRequest` and :func:`defend_with`.

``specdef`` and ``native`` go through :func:`specdef.release.defend.defend`, the one SpecDef entry
point, unchanged. Every other defense: load the source, build its data when it ``needs_data``,
apply it, refuse a non-finite result, and save with :func:`specdef.io.checkpoint.save_defended` —
the manifest carries the defense's record under ``extra.defense``, the directory a model card
(:func:`specdef.io.card.defense_card`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdef.defense import guard
from specdef.defense.apply import DefenseReport
from specdef.defense.layer import count_parameters
from specdef.defenses.catalog import get_defense_entry, make_defense
from specdef.defenses.data import DefenseData, load_defense_data, model_kind
from specdef.errors import SpecdefError
from specdef.io import card
from specdef.io.checkpoint import model_dtype, save_defended
from specdef.release.defend import DefendRequest, defend
from specdef.release.sources import check_finite, load_source
from specdef.utils.dtypes import parse_dtype
from specdef.utils.files import preflight_output

SPECDEF_MODES = {"specdef": "algorithm1", "native": "native"}


@dataclass(frozen=True)
class DefenseRequest:
    """source: a zoo name, Hugging Face directory or specdef checkpoint; output: the directory to
    write; defense: a registry name; values: its config as plain data (``k=v`` strings or a YAML
    mapping's values); dtype: run and store in this dtype (None: the source's); device: where
    SpecDef's modes (``specdef``, ``native``) defend and probe, as in
    :class:`specdef.release.defend.DefendRequest` (None: the CPU; the trained baselines run on the CPU
    only and refuse any other device in one line)."""

    source: str
    output: str | os.PathLike[str]
    defense: str
    values: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    dtype: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class DefenseOutcome:
    output: Path
    record: dict[str, Any]
    seconds: float


def defend_with(request: DefenseRequest) -> DefenseOutcome:
    """Defend ``request.source`` with ``request.defense`` into ``request.output`` (atomically)."""
    start = time.perf_counter()
    entry = get_defense_entry(request.defense)
    defense = make_defense(request.defense, request.values)
    if request.defense in SPECDEF_MODES:
        result = defend(
            DefendRequest(
                source=request.source,
                output=request.output,
                config=defense.config,
                mode=SPECDEF_MODES[request.defense],
                dtype=request.dtype,
                overwrite=request.overwrite,
                device=request.device,
            )
        )
        record = {"name": request.defense, "flags": entry.flags(), **result.to_dict()}
        return DefenseOutcome(Path(request.output), record, time.perf_counter() - start)
    if request.device is not None and torch.device(request.device).type != "cpu":
        raise SpecdefError(
            f"Defense {request.defense!r} trains on the CPU only (its objectives are not tested "
            f"on an accelerator); pass --device cpu instead of {request.device!r}."
        )
    preflight_output(request.output, overwrite=request.overwrite)
    source = load_source(request.source, dtype=parse_dtype(request.dtype))
    kind = model_kind(source.model)
    if kind not in entry.kinds:
        raise SpecdefError(
            f"Defense {request.defense!r} supports {', '.join(entry.kinds)} models; "
            f"{request.source!r} is a {kind} model."
        )
    data = _data(defense.config, kind, source.tokenizer) if entry.needs_data else None
    params_before = count_parameters(source.model)
    defended = defense.apply(source.model, data)
    check_finite(defended.model)
    record = {**defended.record, "data": _data_record(data)}
    report = getattr(defended.model, "specdef_report", None)
    dtype = str(model_dtype(defended.model)).removeprefix("torch.")
    params_after = count_parameters(defended.model)
    facts = None
    if isinstance(report, DefenseReport):
        facts = card.facts_from_defense(
            report.to_dict(), source=request.source, dtype=dtype,
            tolerance=guard.default_tolerance(model_dtype(defended.model)),
        )  # fmt: skip
    text = card.defense_card(
        record, source=request.source, dtype=dtype, params_before=params_before,
        params_after=params_after, specdef_facts=facts,
    )  # fmt: skip
    save_defended(
        defended.model, request.output, report=report if isinstance(report, DefenseReport) else None,
        tokenizer=source.tokenizer, overwrite=request.overwrite,
        extra={"source": request.source, "source_kind": source.kind, "defense": record},
        texts={card.CARD: text},
    )  # fmt: skip
    return DefenseOutcome(Path(request.output), record, time.perf_counter() - start)


def _data(config: Any, kind: str, tokenizer: Any) -> DefenseData:
    inner = getattr(config, "unlearning_config", None)
    values = inner if isinstance(inner, Mapping) else {}
    return load_defense_data(
        kind,
        forget=getattr(config, "forget", None) or values.get("forget"),
        retain=getattr(config, "retain", None) or values.get("retain"),
        tokenizer=tokenizer,
        max_length=int(getattr(config, "max_length", None) or values.get("max_length", 64)),
    )


def _data_record(data: DefenseData | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"forget": data.forget.name, "retain": data.retain.name}


def is_registry_defense(defense: Mapping[str, Any]) -> bool:
    """Whether an experiment's ``defense:`` block names a registry defense other than SpecDef's
    own (``specdef`` / ``native`` keep the Algorithm 1 / native path with its ``alpha`` …)."""
    name = defense.get("name")
    return isinstance(name, str) and name not in SPECDEF_MODES


def apply_named(
    model: Any, defense: Mapping[str, Any], *, tokenizer: Any = None, seed: int | None = None
) -> Any:
    """Apply the defense an experiment's ``defense: {name: NAME, <config keys>}`` block names to a
    live model (in place, or a new model when it changes the architecture), building its data when
    it ``needs_data``; ``seed`` (the run's) is the config's unless the block sets one. Returns the
    :class:`specdef.defenses.registry.Defended`."""
    name = str(defense.get("name"))
    entry = get_defense_entry(name)
    values = {k: v for k, v in defense.items() if k != "name"}
    if seed is not None and "seed" not in values and "seed" in _field_names(entry.config):
        values["seed"] = seed
    bound = make_defense(name, values)
    data = None
    if entry.needs_data:
        data = _data(bound.config, model_kind(model), tokenizer)
    defended = bound.apply(model, data)
    check_finite(defended.model)
    defended.record["data"] = _data_record(data)
    return defended


def _field_names(config: type) -> set[str]:
    return set(getattr(config, "__dataclass_fields__", {}))

"""Attack sweeps: optimizer × learning rate × seed × model variant, one ``results.jsonl`` row per
finished run, resumable.

Every run has a ``run_id``, a hash of its fully resolved description (experiment, task, variant,
attack spec). A rerun reads the rows already in the file and skips their ids, so a sweep killed at
any point — even mid-write — resumes without losing or duplicating rows: a row is appended with one
``write`` + ``fsync`` only after its run finished, and a line cut short by a kill is dropped before
anything new is appended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from specdef.attack.loop import AttackSpec, run_attack
from specdef.errors import SpecdefError
from specdef.tasks import Task
from specdef.utils.files import append_jsonl, read_jsonl
from specdef.utils.progress import track
from specdef.utils.provenance import provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVariant:
    """A model the attacker faces. ``build`` returns a fresh copy for each run (runs train in
    place); ``info`` is stored in every row (e.g. ``{"alpha": 1e4, "defense": {...}}``)."""

    name: str
    build: Callable[[], nn.Module]
    info: Mapping[str, Any] = field(default_factory=dict)


def attack_grid(
    base: AttackSpec,
    *,
    optimizers: Sequence[str] = (),
    lrs: Sequence[float] = (),
    seeds: Sequence[int] = (),
) -> list[AttackSpec]:
    """``base`` with every combination of the given optimizers, learning rates and seeds (an empty
    axis keeps ``base``'s value). Order: optimizer, then lr, then seed."""
    return [
        dataclasses.replace(base, optimizer=opt, lr=float(lr), seed=int(seed))
        for opt in (optimizers or [base.optimizer])
        for lr in (lrs or [base.lr])
        for seed in (seeds or [base.seed])
    ]


def run_id(spec: AttackSpec, *, variant: ModelVariant, task: str, experiment: str) -> str:
    """A stable 16-hex-digit hash of everything that determines the run's outcome."""
    resolved = {
        "experiment": experiment,
        "task": task,
        "variant": variant.name,
        "variant_info": dict(variant.info),
        "spec": spec.to_dict(),
    }
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class SweepSummary:
    """All rows of the grid (finished earlier or now, in grid order), and how many ran now."""

    rows: list[dict[str, Any]]
    skipped: int
    ran: int
    results: Path


def run_sweep(
    task: Task,
    variants: Sequence[ModelVariant],
    specs: Sequence[AttackSpec],
    *,
    results: str | os.PathLike[str],
    experiment: str = "attack",
    runner: Callable[[nn.Module, Task, AttackSpec], Any] = run_attack,
) -> SweepSummary:
    """Run every (variant, spec) pair whose ``run_id`` has no row in ``results`` yet.

    Shows a progress bar with ETA when progress is enabled. Each row holds the identity
    (``run_id``, ``experiment``, ``kind``, ``model``, ``task``), the resolved spec, the variant's
    ``info``, the :class:`~specdef.attack.loop.AttackResult` (``spec``, ``summary``, ``history``,
    ``evals``), ``wall_s`` and ``provenance``.
    """
    if not variants or not specs:
        raise SpecdefError("A sweep needs at least one model variant and one attack spec.")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SpecdefError(f"Model variant names must be unique; found {names}.")
    path = Path(results)
    drop_partial_line(path)
    done = {row.get("run_id"): row for row in read_jsonl(path)}
    grid: dict[str, tuple[str, ModelVariant, AttackSpec]] = {}
    for variant in variants:
        for spec in specs:
            rid = run_id(spec, variant=variant, task=task.name, experiment=experiment)
            grid.setdefault(rid, (rid, variant, spec))
    todo = [g for g in grid.values() if g[0] not in done]
    log.info("sweep %s: %d runs, %d already done", experiment, len(grid), len(grid) - len(todo))
    for rid, variant, spec in track(todo, f"{experiment}", total=len(todo)):
        start = time.perf_counter()
        result = runner(variant.build(), task, spec)
        row = make_row(rid, result.to_dict(), variant=variant, task=task, experiment=experiment)
        row["wall_s"] = round(time.perf_counter() - start, 3)
        row["provenance"] = provenance()
        append_jsonl(path, row)
        done[rid] = row
    return SweepSummary([done[rid] for rid in grid], len(grid) - len(todo), len(todo), path)


def make_row(
    rid: str,
    result: Mapping[str, Any],
    *,
    variant: ModelVariant,
    task: Task,
    experiment: str,
) -> dict[str, Any]:
    """A flat-ish results row: identity, the spec fields the report groups by, then the result."""
    spec = result["spec"]
    row: dict[str, Any] = {
        "run_id": rid,
        "experiment": experiment,
        "kind": "attack",
        "model": variant.name,
        "task": task.name,
        "task_kind": task.kind,
        "alpha": None,
        **dict(variant.info),
    }
    for key in ("optimizer", "lr", "seed", "train", "threshold"):
        row[key] = spec[key]
    row["lora_targets"] = spec["lora_targets"] if spec["train"] == "lora" else None
    row.update(result)
    return row


def drop_partial_line(path: Path) -> None:
    """Truncate a results file to its last complete line (a kill can cut the last one short)."""
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())
            log.warning("dropped a partial last line of %s (a killed run)", path)


def rows_by_lr(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """Group rows by (model variant, optimizer), each group sorted by learning rate."""
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault((str(row["model"]), str(row["optimizer"])), []).append(row)
    return {k: sorted(v, key=lambda r: float(r["lr"])) for k, v in out.items()}

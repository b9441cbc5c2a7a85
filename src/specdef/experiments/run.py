"""Experiments as data: a YAML config → frozen dataclasses → a grid of runs → ``results.jsonl``.

A config names a model, a task, a base defense, a base attack, a ``grid`` of values to sweep and the
seeds. The grid is nested like the config and every list in it is one axis::

    defense: {alpha: null, top_k: 8, targets: all-linear}   # alpha: null = undefended
    attack:  {optimizer: adam, lr: 1.0e-3, steps: 300}
    grid:
      defense: {alpha: [null, 1.0e2, 1.0e4]}
      attack:  {optimizer: [sgd, adam], lr: [1.0e-4, 1.0e-3]}
    seeds: [0, 1, 2]

expands to 3 × 2 × 2 × 3 runs. ``--set key=value`` overrides any value by a dotted key
(``attack.steps=5``, ``model=tiny-llama``, ``seeds=[0]``); setting a key that is also a grid axis
replaces that axis by the single value. Each run gets a ``run_id`` (a hash of its resolved spec), so a
rerun of the same config skips finished runs (:mod:`specdef.attack.sweep` does the resuming).

This module owns the run directory (the resolved ``config.yaml``, ``results.jsonl``, resuming) and the
results rows; parsing, ``--set`` overrides, validation and the grid expansion live in
:mod:`specdef.experiments.config` and are re-exported here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from specdef.attack.sweep import drop_partial_line
from specdef.errors import SpecdefError
from specdef.experiments.config import (
    ExperimentConfig,
    RunSpec,
    expand,
    plain_data,
)
from specdef.experiments.kinds import execute
from specdef.experiments.runners import on_device, validate_runs
from specdef.experiments.search import run_search_cell, validate_search
from specdef.utils.devices import resolve_device
from specdef.utils.files import append_jsonl, read_jsonl, write_text_atomic
from specdef.utils.progress import track
from specdef.utils.provenance import provenance

RESOLVED_NAME = "config.yaml"
RESULTS_NAME = "results.jsonl"


def default_run_dir(config: ExperimentConfig, overrides: Sequence[str] = ()) -> Path:
    """``runs/<name>``, or ``runs/<name>-<hash of the overrides>`` when ``--set`` was used, so a
    miniature run never mixes its rows into the full experiment's."""
    if not overrides:
        return Path("runs") / config.name
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    return Path("runs") / f"{config.name}-{digest}"


def prepare_run_dir(config: ExperimentConfig, run_dir: str | Path) -> Path:
    """Create the run directory and write the resolved config into it. A directory holding a
    different resolved config is refused (its rows would mix two experiments)."""
    path = Path(run_dir)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    existing = path / RESOLVED_NAME
    if existing.exists() and existing.read_text(encoding="utf-8") != text:
        raise SpecdefError(
            f"Run directory {str(path)!r} holds a different resolved config; rerun with the same "
            "config and --set values to resume, or choose another --out."
        )
    if path.exists() and not path.is_dir():
        raise SpecdefError(f"Run directory {str(path)!r} is a file; choose another --out.")
    write_text_atomic(existing, text)
    return path


@dataclass(frozen=True)
class RunSummary:
    """What :func:`run_experiment` did."""

    run_dir: Path
    total: int  # runs in the expanded grid
    skipped: int  # already in results.jsonl (resumed)
    ran: int  # executed now
    seconds: float
    trials: int | None = None  # a searched experiment: trials trained now (``ran`` counts cells)

    @property
    def results(self) -> Path:
        return self.run_dir / RESULTS_NAME


def make_row(run: RunSpec, outcome: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """One results row: identity and resolved spec, then the outcome, wall time and provenance."""

    model = run.model
    row: dict[str, Any] = {
        "run_id": run.run_id,
        "experiment": run.experiment,
        "kind": run.kind,
        "model": model if isinstance(model, str) else str(model.get("name", "model")),
        "model_spec": plain_data(model),
        "task": run.task,
        "seed": run.seed,
        "alpha": run.defense.get("alpha"),
        "defense": plain_data(run.defense),
        "attack": plain_data(run.attack),
        "measure": plain_data(run.measure),
        "data": plain_data(run.data),
    }
    if run.kind == "attack":  # the fields specdef.attack.sweep.make_row puts at the top level
        for key in ("optimizer", "lr", "train", "threshold"):
            if key in run.attack:
                row[key] = run.attack[key]
        if run.attack.get("train") == "lora":
            row["lora_targets"] = plain_data(run.attack.get("lora_targets"))
    row.update(outcome)
    row["wall_s"] = round(seconds, 3)
    row["provenance"] = provenance()
    return row


def run_experiment(
    config: ExperimentConfig,
    *,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> RunSummary:
    """Expand ``config`` and execute every run not yet in ``RUN_DIR/results.jsonl`` (one row
    appended per finished run, so a killed experiment resumes where it stopped). ``limit`` caps
    how many runs execute in this call; ``device`` (``specdef.utils.devices.resolve_device``; None:
    the CPU) is where the runs' models run — not part of a run's id, so rows resume across devices."""
    import time

    runs = expand(config)
    validate(runs)  # the whole grid, before the run directory is written
    path = prepare_run_dir(config, run_dir or default_run_dir(config, overrides))
    start = time.perf_counter()
    with on_device(resolve_device(device) if device is not None else torch.device("cpu")):
        if config.search:
            return _run_searches(config, runs, path, limit=limit, start=start)
        done = _run_resumable(
            runs,
            path / RESULTS_NAME,
            key=lambda run: run.run_id,
            execute=_execute_row,
            limit=limit,
            progress=lambda items, total: track(items, config.name, total=total),
        )
    return RunSummary(path, len(runs), done.skipped, done.ran, time.perf_counter() - start)


def validate(runs: Sequence[RunSpec]) -> None:
    """Every check a grid gets before anything is written: the runs' defense and attack fields
    (:func:`~specdef.experiments.runners.validate_runs`) and searched cells' search blocks."""
    validate_runs(runs)
    validate_search(runs)


def _run_searches(
    config: ExperimentConfig, runs: Sequence[RunSpec], path: Path, *, limit: int | None,
    start: float,
) -> RunSummary:  # fmt: skip
    """A searched experiment: one study per cell (:func:`run_search_cell`), each resumed from its
    storage; ``ran`` counts the cells that trained a trial now, ``skipped`` the complete ones."""
    import time

    drop_partial_line(path / RESULTS_NAME)
    todo = list(runs) if limit is None else list(runs)[: max(limit, 0)]
    trials = ran = 0
    for run in track(todo, config.name, total=len(todo)):
        now = run_search_cell(run, path)
        trials += now
        ran += now > 0
    return RunSummary(path, len(runs), len(todo) - ran, ran, time.perf_counter() - start, trials)


def _execute_row(run: RunSpec) -> dict[str, Any]:
    import time

    start = time.perf_counter()
    outcome = execute(run)
    return make_row(run, outcome, time.perf_counter() - start)


@dataclass(frozen=True)
class _Done:
    skipped: int
    ran: int


def _run_resumable(
    items: Sequence[RunSpec],
    results: Path,
    *,
    key: Callable[[RunSpec], str],
    execute: Callable[[RunSpec], dict[str, Any]],
    limit: int | None,
    progress: Callable[[list[RunSpec], int], Iterable[RunSpec]],
) -> _Done:
    """Run the items whose key has no row in ``results`` yet; append one row per finished item.
    Same resume contract as :func:`specdef.attack.sweep.run_sweep` (which is specific to attack grids on
    one task; experiments mix kinds and tasks): a line cut short by a kill is dropped first."""

    drop_partial_line(results)
    finished = {row.get("run_id") for row in read_jsonl(results)}
    todo = [item for item in items if key(item) not in finished]
    if limit is not None:
        todo = todo[: max(limit, 0)]
    for item in progress(todo, len(todo)):
        append_jsonl(results, execute(item))
    return _Done(
        skipped=len(items) - len([i for i in items if key(i) not in finished]), ran=len(todo)
    )

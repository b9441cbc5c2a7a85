"""Searched attack experiments: a config's ``search:`` block makes every grid cell (model × defense
× optimizer × seed) an Optuna study of the worst-case attacker instead of one fine-tuning run.

Each cell goes through :func:`specdef.attack.search.run_search` — the code path of
``specdef attack --search`` — with the cell's defended model, its attack spec as the base (the
learning rate and the searched hyperparameters are the trial's), and its rows (ordinary attack
rows with ``study``, ``trial``, ``params``, ``trial_state``, ``objective``, the ladder) appended to
the run directory's ``results.jsonl``. The study's storage (``RUN_DIR/study.journal`` unless
``search.storage`` names another journal file or an Optuna RDB URL) keeps it resumable and exact:
a killed ``specdef run`` rerun ends every study with exactly ``trials`` finished trials, one row
each. ``stability_edge`` records the cell's edge once (a ``stability-edge`` row reused on resume)
and puts it in every trial row.

The block's keys are ``trials`` (required), ``optimizers`` (one cell per optimizer; else the
config's ``attack.optimizer`` / grid axis), ``stability_edge`` (``true`` or ``{steps, tol, hvps,
batches}``) and the :class:`~specdef.attack.search.SearchConfig` fields (``pruner``,
``min_resource``, ``reduction_factor``, ``seed``, ``lr_low``, ``lr_high``, ``storage``, ``study``,
``stale_after``). The sampler seed of a cell is ``seed + 1000 × the run seed``, so the seeds'
studies sample independently.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from specdef.attack.edge import StabilityEdge, edge_row, stability_edge
from specdef.attack.metrics import Threshold
from specdef.attack.search import SearchConfig, append_row, read_rows, run_search, search_space
from specdef.attack.sweep import ModelVariant
from specdef.errors import SpecdefError, did_you_mean
from specdef.experiments.config import plain_data
from specdef.experiments.runners import attack_spec, load_run_task, model_name, prepare
from specdef.utils.files import locked

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))
SEARCH_KEYS = (*_CONFIG_FIELDS, "optimizers", "stability_edge")
EDGE_DEFAULTS = {"steps": 50, "tol": 0.05, "hvps": 20, "batches": 1}
_SEED_STRIDE = 1000  # sampler seed of a cell: search.seed + 1000 × run seed


def search_config(run: Any) -> SearchConfig:
    """The :class:`SearchConfig` of a searched cell (unknown keys: did-you-mean errors)."""
    block = dict(run.search)
    for key in block:
        if key not in SEARCH_KEYS:
            raise SpecdefError(did_you_mean(str(key), SEARCH_KEYS, what="search key"))
    if "trials" not in block:
        raise SpecdefError("The search block needs trials (e.g. search: {trials: 30}).")
    fields = {k: v for k, v in block.items() if k in _CONFIG_FIELDS}
    fields["seed"] = int(fields.get("seed", 0)) + _SEED_STRIDE * int(run.seed)
    study = fields.get("study")
    fields["study"] = f"{study or run.experiment}-{run.run_id}"
    try:
        return SearchConfig(**fields)
    except TypeError as err:
        raise SpecdefError(f"search has a value of the wrong type ({err}).") from None


def edge_options(run: Any) -> dict[str, Any] | None:
    """The stability-edge probe settings of a cell (``None``: no edge)."""
    value = run.search.get("stability_edge", False)
    if value is None or value is False:
        return None
    if value is True:
        return dict(EDGE_DEFAULTS)
    if not isinstance(value, Mapping):
        raise SpecdefError(
            f"search.stability_edge must be true, false or a mapping of {sorted(EDGE_DEFAULTS)}; "
            f"found {value!r}."
        )
    for key in value:
        if key not in EDGE_DEFAULTS:
            raise SpecdefError(did_you_mean(str(key), EDGE_DEFAULTS, what="stability_edge key"))
    return {**EDGE_DEFAULTS, **value}


def validate_search(runs: Sequence[Any]) -> None:
    """Check the search block of every searched run before anything is written: its keys, its
    values (through :class:`SearchConfig`), the optimizer's search space and the threshold."""
    for number, run in enumerate(runs, start=1):
        if not run.search:
            continue
        where = f"run {number} ({run.run_id})"
        try:
            search_config(run)
            edge_options(run)
            search_space(str(run.attack.get("optimizer", "adamw")))
            threshold = run.attack.get("threshold")
            if not threshold:
                raise SpecdefError(
                    "A search needs attack.threshold (what it minimizes the steps to), e.g. "
                    "harmful_accuracy>=0.75."
                )
            Threshold.parse(str(threshold))
        except SpecdefError as err:
            raise SpecdefError(f"{where}: {err}") from None


def run_search_cell(run: Any, run_dir: str | Path) -> int:
    """Run one cell's study until it holds ``search.trials`` trials; returns how many trials this
    call trained (0: the study was already complete)."""
    config = search_config(run)
    prepared = prepare(run)
    task = load_run_task(run)
    spec = attack_spec(run, prepared)
    defense = plain_data(run.defense)
    info = {**prepared.fields, "defense": defense, "defense_mode": _mode(run),
            "search_cell": run.run_id, "task_kind": task.kind}  # fmt: skip
    pristine = prepared.model
    variant = ModelVariant(model_name(run.model), lambda: copy.deepcopy(pristine), info)
    optimizer = spec.optimizer
    edges: dict[str, StabilityEdge] = {}
    options = edge_options(run)
    if options is not None:
        edges[optimizer] = _edge(run, Path(run_dir) / "results.jsonl", variant, task, spec, options)
    found = run_search(task, variant, spec, [optimizer], config, out=run_dir,
                       experiment=run.experiment, edges=edges)  # fmt: skip
    return found.ran


def _mode(run: Any) -> str | None:
    if run.defense.get("alpha") is None:
        return None
    return str(run.defense.get("mode", "algorithm1"))


def _edge(
    run: Any,
    results: Path,
    variant: ModelVariant,
    task: Any,
    spec: Any,
    options: Mapping[str, Any],
) -> StabilityEdge:
    """The cell's stability edge: its recorded row if there is one, else bisected and recorded
    (under a lock, so processes sharing the run directory bisect each cell's edge once)."""
    rid = f"edge-{run.run_id}"
    with locked(results.parent / ".locks" / f"{rid}.lock"):
        for row in read_rows(results):
            if row.get("run_id") == rid:
                return StabilityEdge.from_dict(row["stability_edge"])
        edge = stability_edge(
            variant.build, task, spec, horizon=int(options["steps"]),
            tol_decades=float(options["tol"]), hessian_batches=int(options["batches"]),
            max_hvps=int(options["hvps"]),
        )  # fmt: skip
        row = edge_row(rid, edge, model=variant.name, task=task.name, info=variant.info, spec=spec,
                       experiment=run.experiment)  # fmt: skip
        row["seed"] = run.seed
        append_row(results, row)
        return edge

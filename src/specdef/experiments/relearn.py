"""The ``relearn`` kind: the paper's Table 1 shape for any registry defense. One run = one defense
(``defense.name``, its config the other ``defense`` keys; none = the undefended model) × one seed:

1. utility of the source model, defend it (:func:`specdef.experiments.runners.prepare`, the one
   path every kind defends through), utility of the defended model;
2. the curvature of the defended model on the harmful data (``measure.curvature``): top Hessian
   eigenvalues by Lanczos and the GD ceiling 2/λ_max (:func:`specdef.defense.certify.measure_curvature`,
   what ``specdef curvature`` prints);
3. the attacker at each learning rate of a fixed grid (``measure.lrs``, the paper's three rates
   scaled to the model) through the one attack loop, each with its threshold ladder;
4. the worst-case attacker: ``measure.search`` trials of :func:`specdef.attack.search.run_search`
   (the code path of ``specdef attack --search``) from the same attack spec, and per rung the best
   any trial did (:mod:`specdef.attack.search.compare`).

The row holds compact summaries (no per-step history): what :mod:`specdef.report.table1` renders.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Mapping
from typing import Any

from specdef.attack.loop import AttackSpec, evaluate_heldout, run_attack, select_trainable_
from specdef.attack.metrics import Threshold
from specdef.attack.search import SearchConfig, run_search
from specdef.attack.search.compare import best_trial, best_value, rungs, start_value, trained
from specdef.attack.sweep import ModelVariant
from specdef.defense.certify import measure_curvature
from specdef.errors import SpecdefError, did_you_mean
from specdef.experiments.runners import (
    attack_spec,
    load_run_model,
    load_run_task,
    model_name,
    prepare,
)
from specdef.experiments.search import SEARCH_KEYS
from specdef.experiments.search import search_config as cell_search_config

MEASURE_KEYS = ("lrs", "search", "curvature")
CURVATURE_DEFAULTS = {"batch_size": 64, "batches": 1, "top": 3, "max_hvps": 30}
_CELL_ONLY = tuple(
    k for k in SEARCH_KEYS if k not in {f.name for f in dataclasses.fields(SearchConfig)}
)


def validate_relearn(run: Any) -> None:
    """The measure block of a relearn run (before anything is written)."""
    for key in run.measure:
        if key not in MEASURE_KEYS:
            raise SpecdefError(did_you_mean(str(key), MEASURE_KEYS, what="relearn measure key"))
    if not run.attack.get("threshold"):
        raise SpecdefError("A relearn run needs attack.threshold, e.g. harmful_accuracy>=0.75.")
    search_config(run)
    for key in run.measure.get("curvature") or {}:
        if key not in CURVATURE_DEFAULTS:
            raise SpecdefError(did_you_mean(str(key), CURVATURE_DEFAULTS, what="curvature key"))


def search_config(run: Any) -> SearchConfig | None:
    """The searched attacker of ``measure.search`` (None without one), validated by the one
    validator of a config's search block (:func:`specdef.experiments.search.search_config`: its
    keys, ``trials`` required, the seed stride ``seed + 1000 × run seed``) — less the keys only a
    searched attack cell reads (a relearn run attacks with ``attack.optimizer`` and probes no
    stability edge) and less ``storage`` (each run's study lives in a temporary journal)."""
    block = dict(run.measure.get("search") or {})
    if not block:
        return None
    for key in block:
        if key in _CELL_ONLY:
            raise SpecdefError(
                f"measure.search.{key} is read only by an attack experiment's search: block; a "
                "relearn run attacks with attack.optimizer and probes no stability edge (remove it)."
            )
    try:
        config = cell_search_config(dataclasses.replace(run, search=block))
    except SpecdefError as err:
        raise SpecdefError(f"measure.search: {err}") from None
    return dataclasses.replace(config, storage=None)


def _compact(result: Mapping[str, Any], threshold: Threshold) -> dict[str, Any]:
    """One attack's summary: its outcome on the threshold, ladder, best value and last evaluation."""
    summary = result["summary"]
    keep = ("steps_to_threshold", "censored", "censor_reason", "budget", "diverged_at")
    return {
        **{k: summary.get(k) for k in keep},
        "final": summary.get("final"),
        "ladder": summary.get("ladder"),
        "best": best_value([{**result, "kind": "attack"}], threshold.metric,
                           higher_is_better=threshold.higher_is_better),
    }  # fmt: skip


def run_relearn_kind(run: Any) -> dict[str, Any]:
    """Defend, measure utility and curvature, attack over the grid and by search (module doc)."""
    validate_relearn(run)
    source = load_run_model(run)
    task = load_run_task(run)
    before = evaluate_heldout(source, task)
    prepared = prepare(run, model=source)
    model = prepared.model
    spec = attack_spec(run, prepared)
    threshold = Threshold.parse(str(spec.threshold), task_kind=task.kind)
    out: dict[str, Any] = {
        **prepared.fields,
        "defense_name": run.defense.get("name") or "none",
        "task_kind": task.kind,
        "threshold": str(threshold),
        "utility": {"source": before, "defended": evaluate_heldout(model, task)},
    }
    out["curvature"] = _curvature(model, task, run)
    grid = []
    for lr in run.measure.get("lrs") or ():
        attacked = copy.deepcopy(model)
        lr_spec = dataclasses.replace(spec, lr=float(lr))
        select_trainable_(attacked, lr_spec)
        result = run_attack(attacked, task, lr_spec).to_dict()
        grid.append({"lr": float(lr), **_compact(result, threshold)})
    out["grid"] = grid
    config = search_config(run)
    if config is not None:
        out["search"] = _search(run, model, task, spec, config, threshold)
    return out


def _curvature(model: Any, task: Any, run: Any) -> dict[str, Any] | None:
    options = {**CURVATURE_DEFAULTS, **(run.measure.get("curvature") or {})}
    if run.measure.get("curvature") is None:
        return None
    stream = task.train_batches(batch_size=int(options["batch_size"]), seed=run.seed)
    batches = [next(stream) for _ in range(int(options["batches"]))]
    measured = measure_curvature(
        copy.deepcopy(model), task.loss, batches, top=int(options["top"]),
        max_hvps=int(options["max_hvps"]), bounds=False, seed=run.seed,
    )  # fmt: skip
    measured.pop("history", None)
    return measured


def _search(
    run: Any, model: Any, task: Any, spec: AttackSpec, config: SearchConfig, threshold: Threshold
) -> dict[str, Any]:
    """The searched attacker on the defended model: best trial, and per rung the best trial."""
    variant = ModelVariant(
        f"{model_name(run.model)}+{run.defense.get('name') or 'none'}",
        lambda: copy.deepcopy(model),
        {"relearn_run": run.run_id},
    )
    with tempfile.TemporaryDirectory() as tmp:
        found = run_search(task, variant, spec, [spec.optimizer], config, out=tmp,
                           experiment=run.experiment)  # fmt: skip
    rows = trained(found.rows)
    best = found.best.get(spec.optimizer)
    ladder = []
    for rung in rungs(threshold, start_value(rows, threshold.metric)):
        b = best_trial(rows, rung)
        ladder.append({"threshold": str(rung), **b.to_dict()})
    return {
        "trials": config.trials,
        "trained": len(rows),
        "reached": sum(1 for r in rows if r["summary"].get("steps_to_threshold") is not None),
        "best": None if best is None else {
            "trial": best["trial"], "params": best["params"], "lr": best["lr"],
            **_compact(best, threshold),
        },
        "rungs": ladder,
        "trial_lrs": [r["lr"] for r in rows],
    }  # fmt: skip

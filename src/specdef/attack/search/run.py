"""Running a search: each process works on each optimizer's study until it holds N trials,
training one trial at a time with the one attack loop and recording a row per trial."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdef.attack.edge import StabilityEdge
from specdef.attack.loop import AttackResult, AttackSpec, run_attack
from specdef.attack.metrics import Threshold, search_objective, steps_to_threshold
from specdef.attack.search import storage as slots
from specdef.attack.search.rows import append_row, best_trials, read_rows
from specdef.attack.search.space import SearchConfig, study_name, trial_spec
from specdef.attack.search.warm import warm_params
from specdef.attack.sweep import ModelVariant, make_row
from specdef.errors import SpecdefError
from specdef.tasks import Task
from specdef.utils.provenance import provenance

log = logging.getLogger(__name__)

_HEARTBEAT_EVERY_S = 30.0


@dataclass(frozen=True)
class SearchSummary:
    """Rows of every finished trial of the studies (this process's results file), the best row per
    optimizer, the study names and how many trials this process ran."""

    rows: list[dict[str, Any]]
    best: dict[str, dict[str, Any] | None]
    studies: dict[str, str]
    storage: str
    ran: int


def _trial_run_id(study: str, number: int) -> str:
    return hashlib.sha256(f"{study}#{number}".encode()).hexdigest()[:16]


def run_search(
    task: Task,
    variant: ModelVariant,
    base: AttackSpec,
    optimizers: Sequence[str],
    config: SearchConfig,
    *,
    out: str | os.PathLike[str],
    experiment: str = "search",
    edges: Mapping[str, StabilityEdge] | None = None,
    runner: Callable[..., AttackResult] = run_attack,
) -> SearchSummary:
    """Work on each optimizer's study until it has ``config.trials`` trials (this process's share
    when others work on the same storage); rows go to ``<out>/results.jsonl``.

    ``base`` needs a threshold (what the search minimizes the steps to). ``runner`` is called as
    ``runner(model, task, spec, on_eval=…)``. Returns the rows of this results file for these
    studies, in optimizer then trial order, and the best trial per optimizer.
    """
    import optuna  # see storage.open_storage

    if base.threshold is None:
        raise SpecdefError("A search needs a threshold (e.g. --threshold harmful_accuracy>=0.75).")
    threshold = Threshold.parse(base.threshold, task_kind=task.kind)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # library code never prints
    warm = {o: warm_params(o, config) for o in optimizers} if config.warm_start else {}
    storage, where = slots.open_storage(config.storage, out)
    results = Path(out) / "results.jsonl"
    names: dict[str, str] = {}
    ran = 0
    for optimizer in optimizers:
        name = study_name(optimizer, base=base, variant=variant, task=task.name, config=config,
                          experiment=experiment)  # fmt: skip
        names[optimizer] = name
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="minimize",
            pruner=slots.pruner(config, base),
            load_if_exists=True,
        )
        if optimizer in warm:
            slots.enqueue_warm(study, warm[optimizer], config)
        ran += _work(study, task, variant, base, optimizer, config, threshold=threshold,
                     results=results, experiment=experiment, where=where,
                     edge=(edges or {}).get(optimizer), runner=runner)  # fmt: skip
    wanted = set(names.values())
    rows = [r for r in read_rows(results) if r.get("study") in wanted]
    order = {opt: i for i, opt in enumerate(optimizers)}
    rows.sort(key=lambda r: (order.get(str(r["optimizer"]), 0), int(r["trial"])))
    return SearchSummary(rows, best_trials(rows), names, where, ran)


def _work(
    study: Any,
    task: Task,
    variant: ModelVariant,
    base: AttackSpec,
    optimizer: str,
    config: SearchConfig,
    *,
    threshold: Threshold,
    results: Path,
    experiment: str,
    where: str,
    edge: StabilityEdge | None,
    runner: Callable[..., AttackResult],
) -> int:
    """Run this process's share of one study; returns how many trials it trained."""
    import optuna  # see storage.open_storage
    from optuna.trial import TrialState

    ran = 0
    while True:
        slots.requeue_stale(study, config)
        trials = [
            t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(slots.SURPLUS)
        ]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if not waiting and len(trials) >= config.trials:
            if slots.ownerless(study):  # wait until it is owned, or lost and put back to WAITING
                time.sleep(1.0)
                continue
            return ran
        study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(trials))
        trial = study.ask()
        trial.set_user_attr(slots.OWNER, slots.owner())
        if slots.slot(study, trial.number) > config.trials or slots.duplicate_warm(study, trial):
            slots.discard(study, trial)
            continue
        rid = _trial_run_id(study.study_name, trial.number)
        # only a slot put back to WAITING can have a row already (a fresh trial number has none),
        # so the results file — large, every row holds its history — is read only for those
        rerun = any(t.number == trial.number for t in waiting)
        done = {r.get("run_id"): r for r in read_rows(results)} if rerun else {}
        if rid in done:  # trained and recorded, killed before the storage heard of it
            slots.tell_from_row(study, trial, done[rid])
            continue
        row = _run_trial(study, trial, task, variant, base, optimizer, config,
                         threshold=threshold, rid=rid, experiment=experiment, where=where,
                         edge=edge, runner=runner)  # fmt: skip
        if slots.slot(study, trial.number) > config.trials:
            slots.discard(study, trial)  # lost a race that only an RDB server's commit order shows
            continue
        ran += 1
        append_row(results, row)
        slots.tell_from_row(study, trial, row)


def _run_trial(
    study: Any,
    trial: Any,
    task: Task,
    variant: ModelVariant,
    base: AttackSpec,
    optimizer: str,
    config: SearchConfig,
    *,
    threshold: Threshold,
    rid: str,
    experiment: str,
    where: str,
    edge: StabilityEdge | None,
    runner: Callable[..., AttackResult],
) -> dict[str, Any]:
    """Train one trial (reporting to the pruner at each evaluation) and build its row."""
    start = time.perf_counter()
    identity: dict[str, Any] = {
        "study": study.study_name,
        "trial": trial.number,
        "storage": where,
        "sampler_seed": config.seed,
        "stability_edge": edge.to_dict() if edge is not None else None,
        "warm_start": bool(trial.user_attrs.get(slots.WARM)),
    }
    try:
        spec = trial_spec(trial, base, config, optimizer)
    except SpecdefError as err:  # a sampled combination the spec refuses: a failed trial
        return _failure_row(rid, optimizer, variant, task, experiment, identity, str(err))
    seen: list[dict[str, float]] = []
    beat = [time.time()]

    def on_eval(row: dict[str, float]) -> bool:
        seen.append(row)
        reached = steps_to_threshold(seen, threshold, budget=spec.steps)
        trial.report(_objective(reached, seen, threshold, spec.steps), int(row["step"]))
        if time.time() - beat[0] > _HEARTBEAT_EVERY_S:
            beat[0] = time.time()
            trial.set_user_attr(slots.OWNER, slots.owner())
        return bool(trial.should_prune())

    try:
        with warnings.catch_warnings():
            # a re-run slot reports steps its lost run already reported (same values): ignored
            warnings.filterwarnings("ignore", message=".*is already reported.*")
            result = runner(variant.build(), task, spec, on_eval=on_eval)
    except (SpecdefError, RuntimeError, ValueError) as err:  # e.g. a kwarg the optimizer refuses
        log.warning("trial %d of %s failed: %s", trial.number, study.study_name, err)
        identity["params"] = dict(trial.params)
        return _failure_row(rid, optimizer, variant, task, experiment, identity, str(err))
    row = make_row(rid, result.to_dict(), variant=variant, task=task, experiment=experiment)
    outcome = result.outcome
    assert outcome is not None  # base.threshold is set, so run_attack measured it
    pruned = result.stopped_at is not None
    row.update(identity)
    row["params"] = dict(trial.params)
    row["trial_state"] = "pruned" if pruned else "complete"
    row["objective"] = _objective(outcome, result.evals, threshold, spec.steps)
    row["wall_s"] = round(time.perf_counter() - start, 3)
    row["provenance"] = provenance()
    return row


def _objective(
    outcome: Any, evals: Sequence[Mapping[str, Any]], threshold: Threshold, budget: int
) -> float:
    values = [float(r[threshold.metric]) for r in evals if threshold.metric in r]
    finite = [v for v in values if math.isfinite(v)]
    best = (max(finite) if threshold.higher_is_better else min(finite)) if finite else math.nan
    return search_objective(
        outcome, budget=budget, best=best, higher_is_better=threshold.higher_is_better
    )


def _failure_row(
    rid: str,
    optimizer: str,
    variant: ModelVariant,
    task: Task,
    experiment: str,
    identity: Mapping[str, Any],
    error: str,
) -> dict[str, Any]:
    """A failed trial's row (``kind`` ``"search-failure"``, so attack reports skip it)."""
    return {
        "run_id": rid,
        "experiment": experiment,
        "kind": "search-failure",
        "model": variant.name,
        "task": task.name,
        **dict(variant.info),
        "optimizer": optimizer,
        "params": {},
        **identity,
        "trial_state": "fail",
        "objective": None,
        "error": error,
        "provenance": provenance(),
    }

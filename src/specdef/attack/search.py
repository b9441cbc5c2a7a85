"""The worst-case attacker: an Optuna search over an optimizer's hyperparameters for the fewest
steps to a threshold, one study per optimizer, every trial an ordinary attack row.

Each trial draws a learning rate (log-uniform, 1e-12 … 1 by default), warm-up, gradient clipping,
weight decay, schedule and the optimizer's own hyperparameters (its registry entry's
``search_space``), runs :func:`~specdef.attack.loop.run_attack`, and is scored by
:func:`~specdef.attack.metrics.search_objective` (censored steps-to-threshold, ties broken by the
best value reached, diverged worst). Intermediate values from the evaluations feed a successive
halving or Hyperband pruner, which ends hopeless trials early (their row says ``pruned`` and their
censoring says "stopped early").

**Exactly N trials, across kills and processes.** The study lives in a storage (a journal file by
default, or any Optuna RDB URL) shared by every process working on it. The first N trials of the
study by trial number are its *slots*; a trial created past them (two processes racing for the
last slot) is marked ``specdef_surplus`` and failed at once without running or writing a row, and
is not counted. A slot whose process died (same host: its pid is gone; other hosts: no heartbeat
for ``stale_after`` seconds) is put back to ``WAITING`` and re-run with its own parameters. A row
is appended to ``results.jsonl`` before the trial is told; a rerun that finds the row of a trial
the storage still has running tells the storage from the row instead of training again. So a
study ends with exactly N finished trials (complete + pruned + failed) and one row each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from specdef.attack.edge import StabilityEdge
from specdef.attack.loop import SCHEDULES, AttackResult, AttackSpec, run_attack
from specdef.attack.metrics import Threshold, search_objective, steps_to_threshold
from specdef.attack.optim import SearchParam, assemble_kwargs, choice, get_optimizer_entry
from specdef.attack.sweep import ModelVariant, make_row
from specdef.errors import SpecdefError
from specdef.tasks import Task
from specdef.utils.provenance import provenance

log = logging.getLogger(__name__)

PRUNERS = ("halving", "hyperband", "none")
# searched for every optimizer; the learning rate's range is SearchConfig's
COMMON_SPACE: dict[str, SearchParam] = {
    "warmup": choice(0.0, 0.05, 0.1, 0.25),  # fraction of the steps
    "grad_clip": choice(None, 0.1, 1.0, 10.0),
    "weight_decay": choice(0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    "schedule": choice(*SCHEDULES),
}
OWNER = "specdef_owner"
SURPLUS = "specdef_surplus"
_HEARTBEAT_EVERY_S = 30.0


@dataclass(frozen=True)
class SearchConfig:
    """How the attacker searches (fields that change the study are hashed into its name)."""

    trials: int  # finished trials (complete + pruned + failed) each optimizer's study ends with
    storage: str | None = None  # Optuna RDB URL or a journal file path; None: <out>/study.journal
    study: str | None = None  # study name prefix; None: derived from model, task, spec and config
    seed: int = 0  # TPESampler seed (trial k samples with seed + k, so a resumed study repeats)
    pruner: str = "halving"  # halving (successive halving) | hyperband | none
    min_resource: int | None = None  # steps before the first pruning rung; None: max(eval, steps/8)
    reduction_factor: int = 3  # pruners keep the best 1/reduction_factor at each rung
    lr_low: float = 1e-12
    lr_high: float = 1.0
    stale_after: float = 900.0  # s without heartbeat before another host's running trial re-runs

    def __post_init__(self) -> None:
        checks = [
            (self.trials >= 1, f"trials >= 1, found {self.trials}"),
            (self.pruner in PRUNERS, f"pruner in {PRUNERS}, found {self.pruner!r}"),
            (0 < self.lr_low < self.lr_high, f"0 < lr_low < lr_high, found {self.lr_low}, "
             f"{self.lr_high}"),
            (self.reduction_factor >= 2, f"reduction_factor >= 2, found {self.reduction_factor}"),
            (self.min_resource is None or self.min_resource >= 1,
             f"min_resource >= 1, found {self.min_resource}"),
            (self.stale_after > 0, f"stale_after > 0, found {self.stale_after}"),
        ]  # fmt: skip
        for ok, what in checks:
            if not ok:
                raise SpecdefError(f"Invalid search config: expected {what}.")


@dataclass(frozen=True)
class SearchSummary:
    """Rows of every finished trial of the studies (this process's results file), the best row per
    optimizer, the study names and how many trials this process ran."""

    rows: list[dict[str, Any]]
    best: dict[str, dict[str, Any] | None]
    studies: dict[str, str]
    storage: str
    ran: int


def search_space(optimizer: str) -> dict[str, SearchParam]:
    """Everything a trial of ``optimizer`` samples besides the learning rate."""
    own = dict(get_optimizer_entry(optimizer).search_space)
    clash = sorted(set(own) & {*COMMON_SPACE, "lr"})
    if clash:
        raise SpecdefError(f"Optimizer {optimizer!r} search space reuses common names {clash}.")
    space = {**COMMON_SPACE, **own}
    entry = get_optimizer_entry(optimizer)
    if entry.needs_closure or entry.needs_create_graph:
        space["grad_clip"] = choice(None)  # the loop refuses clipping for these (see run_attack)
    return space


def study_name(
    optimizer: str,
    *,
    base: AttackSpec,
    variant: ModelVariant,
    task: str,
    config: SearchConfig,
    experiment: str,
) -> str:
    """A stable name: the same command resumes the same study; a changed spec starts another. The
    trial count is left out, so a rerun with a larger N extends the study."""
    if config.study:
        return f"{config.study}-{optimizer}"
    spec = base.to_dict()
    for key in ("optimizer", "lr"):
        spec.pop(key)
    identity = {
        "spec": spec,
        "variant_info": dict(variant.info),
        "config": {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in ("trials", "storage", "study", "stale_after")},
        "space": {k: dataclasses.asdict(v) for k, v in search_space(optimizer).items()},
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{experiment}-{variant.name}-{task}-{optimizer}-{digest[:10]}"


def open_storage(storage: str | None, out: str | os.PathLike[str]) -> tuple[Any, str]:
    """An Optuna storage and its description: a URL with ``://`` is an RDB storage
    (``sqlite:///path.db``, ``postgresql://…``); anything else is a journal file path; ``None``
    is ``<out>/study.journal``."""
    import optuna  # ≈0.3 s to import; only a search needs it
    from optuna.storages.journal import JournalFileBackend

    if storage is not None and "://" in storage:
        kwargs: dict[str, Any] = {}
        if storage.startswith("sqlite"):
            # several processes on one SQLite file: wait for its write lock instead of failing
            kwargs = {"connect_args": {"timeout": 120}}
        return _rdb_storage(storage, kwargs), storage
    path = Path(storage) if storage is not None else Path(out) / "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path))
    return optuna.storages.JournalStorage(backend), f"journal:{path}"


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], *, attempts: int = 5) -> Any:
    """``RDBStorage(url)``, retried: processes that open a new database together race to create
    its schema (a unique-constraint error on alembic's version row); the losers find it made."""
    import optuna  # see open_storage
    import sqlalchemy.exc  # optuna's RDB dependency

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _pruner(config: SearchConfig, base: AttackSpec) -> Any:
    import optuna  # see open_storage

    first = config.min_resource or max(base.eval_every, base.steps // 8)
    if config.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=config.reduction_factor
        )
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource=base.steps, reduction_factor=config.reduction_factor
        )
    return optuna.pruners.NopPruner()


def _suggest(trial: Any, name: str, param: SearchParam) -> Any:
    if param.kind == "choice":
        return trial.suggest_categorical(name, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(name, int(param.low), int(param.high))
    return trial.suggest_float(name, param.low, param.high, log=param.kind == "log")


def trial_spec(trial: Any, base: AttackSpec, config: SearchConfig, optimizer: str) -> AttackSpec:
    """The attack a trial describes: ``base`` with the sampled hyperparameters."""
    lr = trial.suggest_float("lr", config.lr_low, config.lr_high, log=True)
    space = search_space(optimizer)
    values = {name: _suggest(trial, name, param) for name, param in space.items()}
    own = {k: v for k, v in values.items() if k not in COMMON_SPACE}
    return dataclasses.replace(
        base,
        optimizer=optimizer,
        lr=lr,
        warmup_steps=round(float(values["warmup"]) * base.steps),
        grad_clip=values["grad_clip"],
        weight_decay=float(values["weight_decay"]),
        schedule=str(values["schedule"]),
        optimizer_kwargs={**base.optimizer_kwargs, **assemble_kwargs(own)},
    )


def _trial_run_id(study: str, number: int) -> str:
    return hashlib.sha256(f"{study}#{number}".encode()).hexdigest()[:16]


def _alive(owner: Mapping[str, Any], stale_after: float) -> bool:
    """Whether the process that owns a running trial may still be working on it."""
    if owner.get("host") == socket.gethostname():
        try:
            return bool(abs(psutil.Process(int(owner["pid"])).create_time() - owner["created"]) < 1)
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            return False
    return time.time() - float(owner.get("heartbeat", 0.0)) < stale_after


def _requeue_stale(study: Any, config: SearchConfig) -> None:
    """Put running trials whose process is gone back to WAITING (their parameters stay)."""
    from optuna.trial import TrialState  # see open_storage

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER)
        if owner is None:
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            stale = time.time() - started > config.stale_after
        else:
            stale = not _alive(owner, config.stale_after)
        if not stale:
            continue
        latest = study._storage.get_trial(trial._trial_id)  # re-read: another process may own it
        if latest.state == TrialState.RUNNING and latest.user_attrs.get(OWNER) == owner:
            log.warning("study %s: trial %d lost its process; re-running it", study.study_name,
                        trial.number)  # fmt: skip
            study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)


def _slot(study: Any, number: int) -> int:
    """1-based position of trial ``number`` among the study's non-surplus trials."""
    return 1 + sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < number and not t.user_attrs.get(SURPLUS)
    )


def _owner() -> dict[str, Any]:
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "created": me.create_time(),
            "heartbeat": time.time()}  # fmt: skip


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete rows of ``path``; lines cut short by a killed writer are skipped, even where
    another process appended after them."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a partial line in %s (a killed writer)", path)
    return rows


def append_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append one row with one ``write`` + fsync; a partial last line left by a killed writer is
    closed first, so the new row starts on a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, default=str, allow_nan=True) + "\n"
    with open(path, "ab") as handle:
        if handle.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def best_trials(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Per optimizer, the completed trial with the smallest objective (ties: lower trial number);
    ``None`` where no trial completed. A pure function of search rows."""
    best: dict[str, dict[str, Any] | None] = {}
    for row in rows:
        opt = str(row["optimizer"])
        best.setdefault(opt, None)
        if row.get("trial_state") != "complete":
            continue
        current = best[opt]
        key = (float(row["objective"]), int(row["trial"]))
        if current is None or key < (float(current["objective"]), int(current["trial"])):
            best[opt] = dict(row)
    return best


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
    import optuna  # see open_storage

    if base.threshold is None:
        raise SpecdefError("A search needs a threshold (e.g. --threshold harmful_accuracy>=0.75).")
    threshold = Threshold.parse(base.threshold, task_kind=task.kind)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # library code never prints
    storage, where = open_storage(config.storage, out)
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
            pruner=_pruner(config, base),
            load_if_exists=True,
        )
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
    import optuna  # see open_storage
    from optuna.trial import TrialState

    ran = 0
    while True:
        _requeue_stale(study, config)
        trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if not waiting and len(trials) >= config.trials:
            return ran
        study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(trials))
        trial = study.ask()
        trial.set_user_attr(OWNER, _owner())
        if _slot(study, trial.number) > config.trials:
            _discard(study, trial)
            continue
        rid = _trial_run_id(study.study_name, trial.number)
        done = {r.get("run_id"): r for r in read_rows(results)}
        if rid in done:  # trained and recorded, killed before the storage heard of it
            _tell_from_row(study, trial, done[rid])
            continue
        row = _run_trial(study, trial, task, variant, base, optimizer, config,
                         threshold=threshold, rid=rid, experiment=experiment, where=where,
                         edge=edge, runner=runner)  # fmt: skip
        ran += 1
        if _slot(study, trial.number) > config.trials:
            _discard(study, trial)  # lost a race that only an RDB server's commit order shows
            continue
        append_row(results, row)
        _tell_from_row(study, trial, row)


def _discard(study: Any, trial: Any) -> None:
    from optuna.trial import TrialState  # see open_storage

    trial.set_user_attr(SURPLUS, True)
    study.tell(trial, state=TrialState.FAIL)


def _tell_from_row(study: Any, trial: Any, row: Mapping[str, Any]) -> None:
    from optuna.trial import TrialState  # see open_storage

    state = row["trial_state"]
    # skip_if_finished: a process that re-ran a slot it wrongly took for lost may finish it first
    if state == "complete":
        study.tell(trial, float(row["objective"]), skip_if_finished=True)
    else:
        failed = TrialState.PRUNED if state == "pruned" else TrialState.FAIL
        study.tell(trial, state=failed, skip_if_finished=True)


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
            trial.set_user_attr(OWNER, _owner())
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

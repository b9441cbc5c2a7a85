"""Where a search's study lives and how its processes share it: storages (journal file or RDB
URL), the pruner, the N slots (trials past them are surplus), and stale running trials put back
to WAITING when their process is gone."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from specdef.attack.loop import AttackSpec
from specdef.attack.search.space import SearchConfig

log = logging.getLogger(__name__)

OWNER = "specdef_owner"
SURPLUS = "specdef_surplus"
WARM = "specdef_warm_start"  # the enqueued known-good trial (SearchConfig.warm_start)
# a running trial with no owner was created by a process that died before it could say so (a
# SIGKILL between Optuna's ask and the owner attribute, two journal writes); a live process sets
# it within milliseconds, so after this long such a trial is lost and is re-run
OWNERLESS_GRACE_S = 20.0


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
    # an absolute path: Optuna's lock is a symlink to the journal, and it frees a lock left by a
    # killed process by stat()-ing through that link — a relative link resolves against the lock's
    # directory, the stat fails and every other process waits forever (seen on runs/E2-vision)
    backend = JournalFileBackend(str(path.resolve()))
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


def pruner(config: SearchConfig, base: AttackSpec) -> Any:
    """The Optuna pruner ``config.pruner`` names; its resource is training steps (the pruner sees
    the provisional objective reported at each evaluation)."""
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


def _alive(owner: Mapping[str, Any], stale_after: float) -> bool:
    """Whether the process that owns a running trial may still be working on it."""
    if owner.get("host") == socket.gethostname():
        try:
            return bool(abs(psutil.Process(int(owner["pid"])).create_time() - owner["created"]) < 1)
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            return False
    return time.time() - float(owner.get("heartbeat", 0.0)) < stale_after


def requeue_stale(study: Any, config: SearchConfig) -> None:
    """Put running trials whose process is gone back to WAITING (their parameters stay)."""
    from optuna.trial import TrialState  # see open_storage

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER)
        if owner is None:
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            stale = time.time() - started > min(config.stale_after, OWNERLESS_GRACE_S)
        else:
            stale = not _alive(owner, config.stale_after)
        if not stale:
            continue
        latest = study._storage.get_trial(trial._trial_id)  # re-read: another process may own it
        if latest.state == TrialState.RUNNING and latest.user_attrs.get(OWNER) == owner:
            log.warning("study %s: trial %d lost its process; re-running it", study.study_name,
                        trial.number)  # fmt: skip
            study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)


def ownerless(study: Any) -> int:
    """Running trials that have no owner yet (just created, or their process died before it said
    so; :func:`requeue_stale` re-runs the latter after :data:`OWNERLESS_GRACE_S`)."""
    from optuna.trial import TrialState  # see open_storage

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return sum(1 for t in running if t.user_attrs.get(OWNER) is None)


def slot(study: Any, number: int) -> int:
    """1-based position of trial ``number`` among the study's non-surplus trials (a second
    warm-start trial, enqueued by a process racing another, is surplus too)."""
    trials = study.get_trials(deepcopy=False)
    first_warm = min((t.number for t in trials if t.user_attrs.get(WARM)), default=None)
    return 1 + sum(
        1
        for t in trials
        if t.number < number
        and not t.user_attrs.get(SURPLUS)
        and not (t.user_attrs.get(WARM) and t.number != first_warm)
    )


def duplicate_warm(study: Any, trial: Any) -> bool:
    """Whether ``trial`` is a warm-start trial enqueued after another (two processes each found
    the study without one and enqueued it): it is discarded, so the warm start runs once."""
    if not trial.user_attrs.get(WARM):
        return False
    return any(
        t.user_attrs.get(WARM) and t.number < trial.number for t in study.get_trials(deepcopy=False)
    )


def enqueue_warm(study: Any, params: Mapping[str, Any], config: SearchConfig) -> bool:
    """Enqueue the warm-start trial unless the study has had one (in any state, so a resumed
    study does not run it again) or already holds its N trials; returns whether it enqueued."""
    trials = study.get_trials(deepcopy=False)
    if any(t.user_attrs.get(WARM) for t in trials):
        return False
    if sum(1 for t in trials if not t.user_attrs.get(SURPLUS)) >= config.trials:
        return False
    study.enqueue_trial(dict(params), user_attrs={WARM: True})
    return True


def owner() -> dict[str, Any]:
    """This process as a trial's owner: host, pid, the pid's start time (a reused pid is not the
    owner) and a heartbeat timestamp."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "created": me.create_time(),
            "heartbeat": time.time()}  # fmt: skip


def discard(study: Any, trial: Any) -> None:
    """Fail a surplus trial (created past the N slots) without running it; it is never counted."""
    from optuna.trial import TrialState  # see open_storage

    trial.set_user_attr(SURPLUS, True)
    study.tell(trial, state=TrialState.FAIL)


def tell_from_row(study: Any, trial: Any, row: Mapping[str, Any]) -> None:
    """Finish ``trial`` in the storage as its row says (complete with its objective, pruned, or
    failed)."""
    from optuna.trial import TrialState  # see open_storage

    state = row["trial_state"]
    # skip_if_finished: a process that re-ran a slot it wrongly took for lost may finish it first
    if state == "complete":
        study.tell(trial, float(row["objective"]), skip_if_finished=True)
    else:
        failed = TrialState.PRUNED if state == "pruned" else TrialState.FAIL
        study.tell(trial, state=failed, skip_if_finished=True)

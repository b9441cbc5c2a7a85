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

**Warm start** (``SearchConfig.warm_start``): trial 0 of every study is the optimizer's known-good
attack on the undefended model (``warm``), enqueued once per study — not again on resume, and a
copy enqueued by a racing process is surplus.

Modules: ``space`` (what a trial samples), ``storage`` (slots), ``rows`` (the shared results file),
``run`` (the search), ``compare`` (a searched model against its base's search, rung by rung),
``warm`` (the known-good attacks a study can start from).
"""

from specdef.attack.search.rows import append_row, best_trials, read_rows
from specdef.attack.search.run import SearchSummary, run_search
from specdef.attack.search.space import (
    COMMON_SPACE,
    PRUNERS,
    SearchConfig,
    search_space,
    study_name,
    trial_spec,
)
from specdef.attack.search.storage import OWNER, SURPLUS, open_storage

__all__ = [
    "COMMON_SPACE",
    "OWNER",
    "PRUNERS",
    "SURPLUS",
    "SearchConfig",
    "SearchSummary",
    "append_row",
    "best_trials",
    "open_storage",
    "read_rows",
    "run_search",
    "search_space",
    "study_name",
    "trial_spec",
]

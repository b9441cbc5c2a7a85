"""The worst-case attacker's search: rows with params and steps-to-threshold and a best trial per
optimizer; exactly N trials after a SIGKILL and a rerun; two processes sharing one storage; the
kill between a row and the storage's tell. Real Optuna storages, the real digits MLP from the zoo,
few steps and trials."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import specdef
from specdef import zoo
from specdef.attack.loop import AttackSpec
from specdef.attack.search import SURPLUS, SearchConfig, read_rows, run_search
from specdef.attack.search import storage as slots
from specdef.attack.search.warm import KNOWN_GOOD, warm_params
from specdef.attack.sweep import ModelVariant
from specdef.cli import main
from specdef.errors import SpecdefError
from specdef.release.sources import load_source

SRC = str(Path(specdef.__file__).resolve().parents[1])
SEARCH = ["attack", "mlp-digits", "--data", "digits-harmful", "--batch-size", "32",
          "--threshold", "harmful_accuracy>=0.75", "--eval-every", "10"]  # fmt: skip


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "specdef.cli", *SEARCH, *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def finished(storage: Any, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [
        t for t in study.get_trials() if t.state.is_finished() and not t.user_attrs.get(SURPLUS)
    ]


def journal(path: Path) -> Any:
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    return optuna.storages.JournalStorage(backend)


def check_exact(rows: list[dict[str, Any]], trials: list[Any], n: int) -> None:
    """n finished slots numbered 0..n-1, one row each, the row's objective the storage's value."""
    assert sorted(t.number for t in trials) == list(range(n))
    assert sorted(r["trial"] for r in rows) == list(range(n))
    assert len({r["run_id"] for r in rows}) == n
    by_number = {t.number: t for t in trials}
    for row in rows:
        trial = by_number[row["trial"]]
        assert row["params"] == trial.params
        if row["trial_state"] == "complete":
            assert trial.state == TrialState.COMPLETE and trial.value == row["objective"]


def test_search_rows_params_and_best_per_optimizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*SEARCH, "--optimizer", "adam,sgd", "--search", "3", "--steps", "30",
            "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert [(r["optimizer"], r["trial"]) for r in rows] == [
        ("adam", 0), ("adam", 1), ("adam", 2), ("sgd", 0), ("sgd", 1), ("sgd", 2)
    ]  # fmt: skip
    for row in rows:
        assert row["kind"] == "attack" and row["study"] == out["studies"][row["optimizer"]]
        assert 1e-12 <= row["params"]["lr"] <= 1 and row["lr"] == row["params"]["lr"]
        assert row["spec"]["schedule"] == row["params"]["schedule"]
        s = row["summary"]
        assert "steps_to_threshold" in s and s["budget"] in (30, s.get("stopped_at"))
        # the objective is the censored steps plus a tie-break in (0, 1)
        base = s["steps_to_threshold"]
        if base is None:
            base = 31 if s["censor_reason"] != "diverged" else 32
        assert math.floor(row["objective"]) == base
        assert s["ladder"]["rungs"][0]["threshold"] == "harmful_accuracy>=0.5"
    if any(r["params"].get("betas.0") for r in rows if r["optimizer"] == "adam"):
        adam = next(r for r in rows if r["optimizer"] == "adam")
        assert adam["spec"]["optimizer_kwargs"]["betas"][0] == adam["params"]["betas.0"]
    for optimizer in ("adam", "sgd"):
        mine = [r for r in rows if r["optimizer"] == optimizer and r["trial_state"] == "complete"]
        best = min(mine, key=lambda r: (r["objective"], r["trial"]))
        assert out["best"][optimizer]["trial"] == best["trial"]
    assert main(args) == 0  # a rerun: the studies are complete, nothing is trained again
    again = json.loads(capsys.readouterr().out)
    assert again["trials_run_now"] == 0 and again["rows"] == rows
    assert len(read_rows(tmp_path / "results.jsonl")) == 6


def check_warm(rows: list[dict[str, Any]], optimizer: str, config: SearchConfig) -> None:
    """With a warm start, exactly one row — trial 0 — ran the known-good parameters."""
    warm = [r for r in rows if r["warm_start"]]
    assert [r["trial"] for r in warm] == [0]
    assert warm[0]["params"] == warm_params(optimizer, config)
    assert sum(r["params"] == warm[0]["params"] for r in rows) == 1


@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True])
def test_sigkill_mid_study_then_rerun_gives_exactly_n(tmp_path: Path, warm: bool) -> None:
    n, name = 5, "kill-sgd"
    args = cli("--optimizer", "sgd", "--search", str(n), "--steps", "80", "--study", "kill",
               "--pruner", "none", "--out", str(tmp_path),
               *(["--warm-start"] if warm else []))  # fmt: skip
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = tmp_path / "study.journal"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if path.exists():
                try:
                    if len(finished(journal(path), name)) >= 2:
                        break
                except KeyError:  # the study is not in the journal yet
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = optuna.load_study(study_name=name, storage=journal(path)).get_trials()
    assert 2 <= sum(t.state.is_finished() for t in killed) < n
    rerun = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_rows(tmp_path / "results.jsonl")
    check_exact(rows, finished(journal(path), name), n)
    if warm:
        check_warm(rows, "sgd", SearchConfig(trials=n))


@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True])
def test_two_processes_share_one_sqlite_study(tmp_path: Path, warm: bool) -> None:
    n, url = 8, f"sqlite:///{tmp_path / 'study.db'}"
    outs = [tmp_path / "a", tmp_path / "b"]
    # started together, so both race for the schema, the warm start and the first trials
    argv = cli("--optimizer", "sgd", "--search", str(n), "--steps", "60", "--study", "shared",
               "--storage", url, "--json", *(["--warm-start"] if warm else []))  # fmt: skip
    procs = [
        subprocess.Popen(
            [*argv, "--out", str(out)],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    ran = [json.loads(out)["trials_run_now"] for out, _ in results]
    rows = [r for out in outs for r in read_rows(out / "results.jsonl")]
    check_exact(rows, finished(url, "shared-sgd"), n)
    assert sum(ran) == n and min(ran) >= 1, ran  # both worked on it, nothing ran twice
    if warm:
        check_warm(rows, "sgd", SearchConfig(trials=n))


def test_the_warm_start_runs_once_across_resumes_and_racing_enqueues(tmp_path: Path) -> None:
    """Trial 0 is the known-good attack; a rerun that extends the study does not enqueue it again,
    and a second copy enqueued by a racing process is discarded unrun (exactly N trials)."""
    source = load_source("mlp-digits")
    task = zoo.load_task("digits-harmful")
    variant = ModelVariant("mlp-digits", lambda: copy.deepcopy(source.model), {})
    base = AttackSpec(steps=20, batch_size=32, eval_every=10, threshold="harmful_accuracy>=0.75")
    config = SearchConfig(trials=2, study="warm", pruner="none", lr_low=1e-8, warm_start=True)
    run_search(task, variant, base, ["sgd"], config, out=tmp_path)
    more = dataclasses.replace(config, trials=4)
    assert run_search(task, variant, base, ["sgd"], more, out=tmp_path).ran == 2  # resumed
    storage = journal(tmp_path / "study.journal")
    rows = read_rows(tmp_path / "results.jsonl")
    check_exact(rows, finished(storage, "warm-sgd"), 4)
    check_warm(rows, "sgd", more)
    assert rows[0]["spec"]["lr"] == KNOWN_GOOD["sgd"].params["lr"]
    assert rows[0]["spec"]["batch_size"] == 32  # the study's batch, not the one it was found at

    # two processes that each found the study empty enqueue it twice: the second copy is surplus
    raced = tmp_path / "raced"
    raced.mkdir()
    study = optuna.create_study(study_name="warm-sgd", storage=journal(raced / "study.journal"))
    for _ in range(2):
        study.enqueue_trial(warm_params("sgd", config), user_attrs={slots.WARM: True})
    run_search(task, variant, base, ["sgd"], config, out=raced)
    rows = read_rows(raced / "results.jsonl")
    kept = finished(journal(raced / "study.journal"), "warm-sgd")
    assert [t.number for t in kept] == [0, 2] == [r["trial"] for r in rows]  # 1: the copy
    check_warm(rows, "sgd", config)


def test_a_warm_start_outside_the_searched_range_is_refused(tmp_path: Path) -> None:
    config = SearchConfig(trials=2, lr_high=1e-3, warm_start=True)  # sgd's known lr is 0.31
    with pytest.raises(SpecdefError, match="outside the searched range"):
        warm_params("sgd", config)
    with pytest.raises(SpecdefError, match="No known-good attack"):
        warm_params("nope", config)


def test_kill_between_row_and_tell_reuses_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = load_source("mlp-digits")
    task = zoo.load_task("digits-harmful")
    variant = ModelVariant("mlp-digits", lambda: copy.deepcopy(source.model), {})
    base = AttackSpec(steps=20, batch_size=32, eval_every=10, threshold="harmful_accuracy>=0.75")
    config = SearchConfig(trials=3, study="tell", pruner="none")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = {"host": slots.socket.gethostname(), "pid": int(dead.stdout), "created": 0.0,
            "heartbeat": 0.0}  # fmt: skip
    monkeypatch.setattr(slots, "owner", lambda: dict(gone))  # as if a dead process ran it
    real_tell = slots.tell_from_row

    def killed(*_: Any) -> None:
        raise KeyboardInterrupt  # the process dies after the row is on disk, before the tell

    monkeypatch.setattr(slots, "tell_from_row", killed)
    with pytest.raises(KeyboardInterrupt):
        run_search(task, variant, base, ["sgd"], config, out=tmp_path)
    assert len(read_rows(tmp_path / "results.jsonl")) == 1
    monkeypatch.setattr(slots, "tell_from_row", real_tell)
    summary = run_search(task, variant, base, ["sgd"], config, out=tmp_path)
    assert summary.ran == 2  # trials 1 and 2; trial 0 was told from its row, not trained again
    storage = journal(tmp_path / "study.journal")
    check_exact(read_rows(tmp_path / "results.jsonl"), finished(storage, "tell-sgd"), 3)


def test_a_trial_killed_before_it_had_an_owner_is_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILL between Optuna's ask and the owner attribute leaves a running trial nobody owns;
    the next run waits out the grace, re-runs that slot and ends with exactly N trials."""
    source = load_source("mlp-digits")
    task = zoo.load_task("digits-harmful")
    variant = ModelVariant("mlp-digits", lambda: copy.deepcopy(source.model), {})
    base = AttackSpec(steps=20, batch_size=32, eval_every=10, threshold="harmful_accuracy>=0.75")
    config = SearchConfig(trials=2, study="orphan", pruner="none")
    storage = journal(tmp_path / "study.journal")
    optuna.create_study(study_name="orphan-sgd", storage=storage, direction="minimize").ask()
    monkeypatch.setattr(slots, "OWNERLESS_GRACE_S", 0.5)
    summary = run_search(task, variant, base, ["sgd"], config, out=tmp_path)
    assert summary.ran == 2
    check_exact(read_rows(tmp_path / "results.jsonl"), finished(storage, "orphan-sgd"), 2)


def test_a_journal_under_a_relative_out_is_opened_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna frees a journal lock left by a killed process by stat()-ing through its symlink to
    the journal; with a relative journal path the link resolves against the lock's own directory,
    the stat fails, and every other process waits forever. So the journal is opened absolute."""
    monkeypatch.chdir(tmp_path)
    storage, where = slots.open_storage(None, "runs/x")
    assert where == "journal:runs/x/study.journal"
    path = Path(storage._backend._file_path)
    assert path.is_absolute() and path == tmp_path / "runs" / "x" / "study.journal"

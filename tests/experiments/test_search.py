"""Searched experiments (a config's ``search:`` block): one Optuna study per grid cell through the
same code path as ``specdef attack --search`` (a cell's trials equal the command's, trial for
trial), ordinary attack rows with params and ladder, the stability edge recorded once per cell,
exact trial counts after a SIGKILL and a rerun, and validation before anything is written. Real
zoo model and data, few trials and steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import specdef
from specdef.attack.search import read_rows
from specdef.cli import main
from specdef.experiments.config import expand, load_config
from specdef.utils.files import read_jsonl

SRC = str(Path(specdef.__file__).resolve().parents[1])
CONFIG: dict[str, Any] = {
    "name": "search-mini",
    "kind": "attack",
    "model": "mlp-digits",
    "task": "digits-harmful",
    "defense": {"alpha": None, "top_k": 8, "force": True},
    "attack": {
        "optimizer": "adam",
        "lr": 1.0e-3,
        "steps": 20,
        "batch_size": 32,
        "eval_every": 10,
        "threshold": "harmful_accuracy>=0.75",
    },
    "grid": {"defense": {"alpha": [None, 1.0e4]}},
    "seeds": [0],
    "search": {"trials": 2, "optimizers": ["sgd", "adam"], "stability_edge": {"steps": 5}},
}


def write(tmp_path: Path, config: dict[str, Any], name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def test_search_block_runs_one_study_per_cell_like_the_attack_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = write(tmp_path, CONFIG), tmp_path / "run"
    cells = expand(load_config(path))
    # model × defense α × optimizer × seed, the optimizer an axis before the seeds
    assert [(c.defense["alpha"], c.attack["optimizer"]) for c in cells] == [
        (None, "sgd"), (None, "adam"), (1e4, "sgd"), (1e4, "adam")
    ]  # fmt: skip
    argv = ["run", str(path), "--out", str(out), "--json", "--threads", "1"]
    done = run_json(argv, capsys)
    assert (done["runs"], done["ran"], done["trials_run"]) == (4, 4, 8)
    rows = read_jsonl(out / "results.jsonl")
    trials = [r for r in rows if r["kind"] == "attack"]
    edges = {r["run_id"]: r for r in rows if r["kind"] == "stability-edge"}
    assert len(trials) == 8 and len(edges) == 4 and len(rows) == 12
    for cell in cells:
        mine = [r for r in trials if r["search_cell"] == cell.run_id]
        assert sorted(r["trial"] for r in mine) == [0, 1] and len({r["study"] for r in mine}) == 1
        for row in mine:
            assert row["alpha"] == cell.defense["alpha"]
            assert row["optimizer"] == cell.attack["optimizer"] and row["seed"] == 0
            assert row["lr"] == row["params"]["lr"] and row["trial_state"] in ("complete", "pruned")
            assert row["summary"]["ladder"]["rungs"][0]["threshold"] == "harmful_accuracy>=0.5"
            assert row["experiment"] == "search-mini"
            assert row["defense_mode"] == (None if cell.defense["alpha"] is None else "algorithm1")
            # every trial carries its cell's edge, bisected once and recorded as a row
            edge = edges[f"edge-{cell.run_id}"]["stability_edge"]
            assert row["stability_edge"] == edge and edge["horizon"] == 5
    # the same code path as `specdef attack --search`: the undefended sgd cell's trials are the
    # command's, trial for trial (same sampler seed, same base spec, same pruner)
    cli = tmp_path / "cli"
    assert main(["attack", "mlp-digits", "--data", "digits-harmful", "--optimizer", "sgd",
                 "--search", "2", "--steps", "20", "--batch-size", "32", "--eval-every", "10",
                 "--threshold", "harmful_accuracy>=0.75", "--out", str(cli), "--json"]) == 0  # fmt: skip
    command = json.loads(capsys.readouterr().out)["rows"]
    cell = [r for r in trials if r["search_cell"] == cells[0].run_id]
    assert [(r["params"], r["objective"], r["trial_state"]) for r in cell] == [
        (r["params"], r["objective"], r["trial_state"]) for r in command
    ]
    # a rerun resumes: every study is complete, nothing trains, no row is added
    again = run_json(argv, capsys)
    assert (again["ran"], again["resumed_skipped"], again["trials_run"]) == (0, 4, 0)
    assert read_jsonl(out / "results.jsonl") == rows


def test_seeds_search_independently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {**CONFIG, "grid": {}, "seeds": [0, 1],
              "search": {"trials": 2, "optimizers": ["sgd"], "pruner": "none"}}  # fmt: skip
    path, out = write(tmp_path, config), tmp_path / "run"
    run_json(["run", str(path), "--out", str(out), "--json"], capsys)
    rows = read_jsonl(out / "results.jsonl")
    by_seed = {s: [r["params"]["lr"] for r in rows if r["seed"] == s] for s in (0, 1)}
    assert len(by_seed[0]) == len(by_seed[1]) == 2 and by_seed[0] != by_seed[1]
    assert {r["sampler_seed"] for r in rows} == {0, 1000}


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"trails": 3}, r"Unknown search key 'trails'. Did you mean: trials"),
        ({"trials": 2, "prunr": "none"}, r"Unknown search key 'prunr'. Did you mean: pruner"),
        ({"trials": 2, "stability_edge": {"stpes": 3}}, r"stability_edge key 'stpes'.*steps"),
        ({"trials": 2, "optimizers": ["sgdd"]}, r"Unknown optimizer 'sgdd'. Did you mean: sgd"),
        ({"trials": 0}, r"trials >= 1"),
        ({"trials": 2, "pruner": "fast"}, r"pruner in"),
        ({"optimizers": ["sgd"]}, r"needs trials"),
    ],
)
def test_a_bad_search_block_fails_before_anything_is_written(
    tmp_path: Path, search: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    path = write(tmp_path, {**CONFIG, "search": search})
    for args in (["--dry-run"], ["--out", str(tmp_path / "run")]):
        assert main(["run", str(path), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attack": {"steps": 5}}, r"needs attack.threshold"),
        ({"grid": {"attack": {"optimizer": ["sgd"]}}}, r"optimizers twice"),
        ({"kind": "curvature"}, r"only attack experiments search"),
    ],
)
def test_a_search_needs_a_threshold_one_optimizer_list_and_an_attack(
    tmp_path: Path, change: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    path = write(tmp_path, {**CONFIG, **change})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigkill_mid_experiment_then_rerun_gives_exactly_n_per_cell(tmp_path: Path) -> None:
    n = 4
    config = {**CONFIG, "attack": {**CONFIG["attack"], "steps": 60},
              "search": {"trials": n, "optimizers": ["sgd"], "pruner": "none"}}  # fmt: skip
    path, out = write(tmp_path, config), tmp_path / "run"
    argv = [sys.executable, "-m", "specdef.cli", "run", str(path), "--out", str(out),
            "--threads", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.time() + 180
    try:  # kill it inside the second cell's study (the first is complete, the second partial)
        while time.time() < deadline and proc.poll() is None:
            if len(read_rows(results)) >= n + 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert n + 2 <= len(read_rows(results)) < 2 * n
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_jsonl(results)
    assert len(rows) == 2 * n and len({r["run_id"] for r in rows}) == 2 * n
    for cell in expand(load_config(path)):
        mine = sorted(r["trial"] for r in rows if r["search_cell"] == cell.run_id)
        assert mine == list(range(n)), (cell.defense, mine)

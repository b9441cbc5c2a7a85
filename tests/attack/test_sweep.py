"""Sweeps: stable run ids, one row per run with provenance, reruns skip finished rows, and a sweep
killed with SIGKILL part-way resumes to exactly the rows of a clean run (acceptance 5)."""

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
from safetensors.torch import load_file, save_file

from _attack_helpers import digits_task, pretrained_mlp
from specdef.architectures import MLP
from specdef.attack.loop import AttackSpec
from specdef.attack.sweep import ModelVariant, attack_grid, run_id, run_sweep
from specdef.tasks import ClassificationTask
from specdef.utils.files import read_jsonl

# The child process runs this sweep (six runs of ≈0.1 s) on data and weights the test saved as
# safetensors, so that it imports neither scikit-learn nor re-trains the starting model.
SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from specdef.architectures import MLP
from specdef.attack.loop import AttackSpec
from specdef.attack.sweep import ModelVariant, attack_grid, run_sweep
from specdef.tasks import ClassificationTask
t = load_file(sys.argv[2])
task = ClassificationTask("digits-5-9", (t["x"], t["y"]), {"harmful": (t["hx"], t["hy"])})
def build():
    model = MLP(64, (64, 64), 10)
    model.load_state_dict(load_file(sys.argv[3]))
    return model
{GRID}
run_sweep(task, [ModelVariant("mlp", build)], specs, results=sys.argv[1])
"""
GRID = """
base = AttackSpec(steps=40, batch_size=64, eval_every=10, threshold="harmful_accuracy>=0.8")
specs = attack_grid(base, optimizers=["adam", "sgd-momentum"], lrs=[1e-3, 1e-2, 1e-1])
"""
SCRIPT = SCRIPT.replace("{GRID}", GRID)


def load_mlp(path: Path) -> MLP:
    model = MLP(64, (64, 64), 10)
    model.load_state_dict(load_file(path))
    return model


def stable(row: dict[str, Any]) -> str:
    """A row without the fields that differ between two runs of the same thing (time, host)."""
    out = {k: v for k, v in row.items() if k not in ("provenance", "wall_s")}
    out["summary"] = {k: v for k, v in row["summary"].items() if k != "seconds"}
    return json.dumps(out, sort_keys=True)


@pytest.mark.slow  # two child processes each import torch (≈ 5 s apiece on a busy 2-core box)
def test_killed_sweep_resumes_to_the_rows_of_a_clean_run(tmp_path: Path) -> None:
    task = digits_task(range(5, 10))
    (x, y), (hx, hy) = task.train, task.heldout["harmful"]
    save_file({"x": x, "y": y, "hx": hx, "hy": hy}, tmp_path / "data.safetensors")
    save_file(pretrained_mlp().state_dict(), tmp_path / "model.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "data.safetensors"), str(tmp_path / "model.safetensors")]

    def run_child(path: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", SCRIPT, str(path), *args], env=env)

    clean, killed = tmp_path / "clean.jsonl", tmp_path / "killed.jsonl"
    scope: dict[str, Any] = {"AttackSpec": AttackSpec, "attack_grid": attack_grid}
    exec(GRID, scope)  # the clean run, in this process, on the same data and weights
    variant = ModelVariant("mlp", lambda: load_mlp(tmp_path / "model.safetensors"))
    plain = ClassificationTask("digits-5-9", (x, y), {"harmful": (hx, hy)})
    run_sweep(plain, [variant], scope["specs"], results=clean)
    child = run_child(killed)
    deadline = time.monotonic() + 300
    while len(read_jsonl(killed)) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.poll() is None, "the sweep finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    partial = read_jsonl(killed)
    assert 2 <= len(partial) < 6
    with open(killed, "a") as handle:  # a kill in the middle of a write leaves half a line
        handle.write('{"run_id": "half a ro')
    assert run_child(killed).wait(timeout=300) == 0
    resumed, reference = read_jsonl(killed), read_jsonl(clean)
    assert len(reference) == 6
    assert sorted(stable(r) for r in resumed) == sorted(stable(r) for r in reference)
    assert [r["run_id"] for r in resumed[: len(partial)]] == [r["run_id"] for r in partial]


def test_rerun_skips_finished_rows(tmp_path: Path) -> None:
    task = digits_task(range(5, 10))
    variant = ModelVariant("mlp", pretrained_mlp, {"alpha": None})
    specs = attack_grid(AttackSpec(steps=5, eval_every=5), lrs=[1e-3, 1e-2], seeds=[0, 1])
    first = run_sweep(task, [variant], specs, results=tmp_path / "r.jsonl")
    assert (first.ran, first.skipped) == (4, 0)
    calls: list[AttackSpec] = []

    def runner(model: Any, task: Any, spec: AttackSpec) -> Any:
        calls.append(spec)
        raise AssertionError("a finished run was executed again")

    again = run_sweep(task, [variant], specs, results=tmp_path / "r.jsonl", runner=runner)
    assert (again.ran, again.skipped, calls) == (0, 4, [])
    assert [r["run_id"] for r in again.rows] == [r["run_id"] for r in first.rows]
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 4
    row = rows[0]
    assert row["kind"] == "attack" and row["model"] == "mlp" and row["task"] == task.name
    assert {"git", "versions", "time_utc"} <= set(row["provenance"])
    assert row["spec"]["lr"] == row["lr"] and row["evals"][0]["step"] == 0


def test_run_id_is_stable_and_sensitive() -> None:
    variant = ModelVariant("mlp", pretrained_mlp)
    a = run_id(AttackSpec(lr=1e-3), variant=variant, task="t", experiment="e")
    assert a == run_id(AttackSpec(lr=1e-3), variant=variant, task="t", experiment="e")
    assert len(a) == 16
    others = {
        run_id(AttackSpec(lr=1e-2), variant=variant, task="t", experiment="e"),
        run_id(AttackSpec(lr=1e-3, seed=1), variant=variant, task="t", experiment="e"),
        run_id(
            AttackSpec(lr=1e-3), variant=ModelVariant("x", pretrained_mlp), task="t", experiment="e"
        ),
        run_id(AttackSpec(lr=1e-3), variant=variant, task="u", experiment="e"),
    }
    assert a not in others and len(others) == 4

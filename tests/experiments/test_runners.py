"""YAML ``model:`` takes a zoo name, a Hugging Face directory or a specdef checkpoint — validated
before anything runs (``--dry-run`` included), and loaded for real when it is a directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from specdef.cli import main
from specdef.experiments.config import load_config
from specdef.experiments.run import run_experiment
from specdef.io.checkpoint import load_defended
from specdef.utils.files import read_jsonl
from specdef.zoo import load_model

TINY = ["search=null", "seeds=[0]", "attack.steps=2", "grid.attack.optimizer=[sgd]",
        "grid.attack.lr=[0.1]", "grid.variants=[{defense.alpha: null}]"]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "message"),
    [("/nonexistent/model-dir", r"Unknown model '/nonexistent/model-dir'.*Hugging Face model directory"),
     ("mlp-digit", r"Did you mean: mlp-digits"),
     ("EMPTY", r"is a directory without config\.json or specdef_manifest\.json")],
)  # fmt: skip
def test_bad_models_are_refused_on_dry_run(
    tmp_path: Path, model: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if model == "EMPTY":
        model = str(tmp_path)
    capsys.readouterr()
    assert main(["run", "E2-vision", "--set", f"model={model}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_a_checkpoint_directory_runs_as_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    argv = ["defend", "mlp-digits", "-o", str(ckpt), "--alpha", "100", "--top-k", "2"]
    assert main([*argv, "--threads", "1"]) == 0
    assert main(["run", "E2-vision", "--set", f"model={ckpt}", "--dry-run"]) == 0
    config = load_config("E2-vision", [*TINY, f"model={ckpt}"])
    summary = run_experiment(config, run_dir=tmp_path / "run")
    rows = read_jsonl(summary.results)
    assert summary.ran == len(rows) == 1
    assert rows[0]["model"] == str(ckpt)
    # the checkpoint was attacked, not the zoo model: it has the compensation layers' parameters
    defended = sum(p.numel() for p in load_defended(ckpt).parameters())
    assert defended > sum(p.numel() for p in load_model("mlp-digits").parameters())
    assert json.dumps(rows[0]).count(str(defended)) >= 1, rows[0]

"""Experiment YAML ``defense: {name: NAME, …}``: a registry defense is applied to the run's model
before the attack (or the curvature measurement), its record is in the row, and a bad name or key
fails before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from specdef.errors import SpecdefError
from specdef.experiments.config import config_from_mapping, expand
from specdef.experiments.run import run_experiment
from specdef.utils.files import read_jsonl


def _config(kind: str, defense: dict[str, Any], **extra: Any) -> Any:
    return config_from_mapping(
        {
            "name": "defenses-test",
            "kind": kind,
            "model": "mlp-digits",
            "task": "digits-harmful",
            "defense": defense,
            "seeds": [0],
            **extra,
        }
    )


def test_a_named_defense_runs_before_the_attack(tmp_path: Path) -> None:
    config = _config(
        "attack",
        {"name": "npo", "steps": 3},
        attack={"optimizer": "adam", "lr": 1e-3, "steps": 2, "eval_every": 2},
    )
    (run,) = expand(config)
    assert run.defended and run.defense == {"name": "npo", "steps": 3}
    run_experiment(config, run_dir=tmp_path)
    (row,) = read_jsonl(tmp_path / "results.jsonl")
    report = row["defense_report"]
    assert report["name"] == "npo" and report["training"]["steps_run"] == 3
    assert report["after"]["harmful_loss"] > report["before"]["harmful_loss"]
    assert row["summary"]["steps_run"] == 2  # the attack ran on the defended model


def test_a_named_defense_runs_before_the_curvature_measurement(tmp_path: Path) -> None:
    config = _config("curvature", {"name": "gradient-ascent", "steps": 2}, measure={"top": 1})
    run_experiment(config, run_dir=tmp_path)
    (row,) = read_jsonl(tmp_path / "results.jsonl")
    assert row["defense_report"]["name"] == "gradient-ascent"
    assert row["sigma1"] > 0


@pytest.mark.parametrize(
    ("defense", "message"),
    [({"name": "npoo"}, "Did you mean: npo"), ({"name": "npo", "stepz": 3}, "Did you mean: steps")],
)
def test_bad_names_and_keys_fail_before_any_run(
    defense: dict[str, Any], message: str, tmp_path: Path
) -> None:
    config = _config("attack", defense, attack={"steps": 1})
    with pytest.raises(SpecdefError, match=message):
        run_experiment(config, run_dir=tmp_path)
    assert not (tmp_path / "results.jsonl").exists()

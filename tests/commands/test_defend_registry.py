"""`specdef defend --defense NAME`: a baseline's output directory loads where every specdef
checkpoint loads, with its record in the manifest and a model card; SpecDef by name takes the
existing path; misuse is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdef.cli import main
from specdef.defense.layer import defended_layers
from specdef.defenses.run import DefenseRequest, defend_with
from specdef.errors import SpecdefError
from specdef.io.checkpoint import MANIFEST
from specdef.release.sources import load_source


def test_a_baseline_output_loads_with_its_record_and_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "npo"
    rc = main(["defend", "mlp-digits", "-o", str(out), "--defense", "npo",
               "--defense-config", "steps=3", "--threads", "1"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "harmful_loss" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    record = manifest["extra"]["defense"]
    assert record["name"] == "npo" and record["config"]["steps"] == 3
    assert record["data"] == {"forget": "digits-harmful", "retain": "digits-benign"}
    assert record["after"]["harmful_loss"] > record["before"]["harmful_loss"]
    card = (out / "README.md").read_text()
    assert "Negative Preference Optimization" in card and "Limits" in card
    source = load_source(str(out))
    assert source.kind == "specdef-checkpoint"
    assert torch.isfinite(source.model(torch.zeros(1, 64))).all()


def test_specdef_by_name_takes_the_existing_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "spec"
    rc = main(["defend", "mlp-digits", "-o", str(out), "--defense", "specdef",
               "--defense-config", "alpha=100", "top_k=2"])  # fmt: skip
    assert rc == 0
    assert len(defended_layers(load_source(str(out)).model)) == 3
    assert "SpecDef Algorithm 1" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--defense", "npoo"], "Did you mean: npo"),
        (["--defense", "npo", "--defense-config", "stepz=3"], "Did you mean: steps"),
        (["--defense", "npo", "--alpha", "10"], "--defense-config"),
        ([], "--alpha and --top-k"),
        (["--defense", "specdef", "--mode", "native"], "--defense native"),
    ],
)
def test_misuse_is_one_line_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["defend", "mlp-digits", "-o", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["specdef", "native"])
def test_specdef_by_name_defends_on_the_requested_device(name: str, tmp_path: Path) -> None:
    # the device reaches load_source: a name no machine has is refused there, nothing written
    request = DefenseRequest(source="mlp-digits", output=tmp_path / "x", defense=name,
                             values={"alpha": 100, "top_k": 2}, device="gpu")  # fmt: skip
    with pytest.raises(SpecdefError, match="Unknown device 'gpu'"):
        defend_with(request)
    assert not (tmp_path / "x").exists()


def test_a_trained_defense_refuses_a_device_other_than_the_cpu(tmp_path: Path) -> None:
    # the trained baselines run on the CPU only: another device is one line, never silently the CPU
    request = DefenseRequest(source="mlp-digits", output=tmp_path / "x", defense="npo",
                             values={"steps": 1}, device="cuda:0")  # fmt: skip
    with pytest.raises(SpecdefError, match="trains on the CPU only"):
        defend_with(request)
    assert not (tmp_path / "x").exists()

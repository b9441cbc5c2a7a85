"""``specdef curvature`` end to end on a saved defended checkpoint (digits MLP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdef.architectures import build_architecture
from specdef.cli import main
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.io.checkpoint import save_defended

ARCH = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [16], "out_features": 10}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_architecture(ARCH["name"], **ARCH["kwargs"])
    apply_specdef_(model, SpecDefConfig(alpha=100.0, top_k=2, targets=("layers.0",)))
    return save_defended(model, tmp_path_factory.mktemp("ck") / "defended", architecture=ARCH)


def test_curvature_cli_json_blocks_and_bounds(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["curvature", str(checkpoint), "--data", "digits", "--batch-size", "32", "--json"]
    assert main([*args, "--top", "2", "--max-hvps", "8", "--max-pairs", "1"]) == 0
    out = json.loads(capsys.readouterr().out)["model"]
    assert out["block"] == "all" and out["hvps"] <= 8 and len(out["eigenvalues"]) == 2
    assert out["eigenvalues"][0] >= out["eigenvalues"][1]
    assert out["lr_ceiling"] == pytest.approx(2 / out["eigenvalues"][0])
    assert out["certificate"]["value"] >= out["spectral_bound"]["value"] > 0
    assert main([*args, "--block", "untouched", "--max-hvps", "4", "--no-bounds"]) == 0
    untouched = json.loads(capsys.readouterr().out)["model"]
    assert untouched["parameters"] == 10 * 16 + 10  # only the head is untouched
    assert "certificate" not in untouched


def test_curvature_cli_user_errors(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["curvature", str(checkpoint), "--data", "digitz"]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["curvature", str(checkpoint), "--data", "digits", "--top", "0"]) == 2
    assert main(["curvature", "mlp-digits", "--data", "digits", "--compare"]) == 2
    err = capsys.readouterr().err
    assert "--compare needs --alpha" in err and "Traceback" not in err

"""``specdef verify`` on both kinds of release (Algorithm 1 checkpoint, native stock checkpoint) and
its one-line refusal of a directory that is neither."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tiny import tiny_llama
from specdef.cli import main


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "src"
    tiny_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["algorithm1", "native"])
def test_verify_passes_on_either_release(
    source: Path, tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / mode
    args = ["defend", str(source), "-o", str(out), "--alpha", "100", "--top-k", "2", "--mode", mode]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["verify", str(source), str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["max_rel_diff"] <= result["tolerance"]
    grows = result["params_defended"] > result["params_original"]
    assert grows == (mode == "algorithm1")  # native keeps the parameter count


def test_verify_refuses_a_plain_directory(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(source), str(source)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a specdef release" in err[0]

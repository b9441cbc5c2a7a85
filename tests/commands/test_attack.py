"""``specdef attack`` end to end on a saved defended checkpoint (digits MLP, α = 1e4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _attack_helpers import pretrained_mlp
from specdef.cli import main
from specdef.defense.apply import apply_specdef_
from specdef.defense.config import SpecDefConfig
from specdef.io.checkpoint import save_defended


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    arch = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64, 64], "out_features": 10}}
    plain = pretrained_mlp()
    defended = pretrained_mlp()
    apply_specdef_(defended, SpecDefConfig(alpha=1e4, top_k=8, targets=("layers.2",)))
    return {
        "plain": save_defended(plain, root / "plain", architecture=arch),
        "defended": save_defended(defended, root / "defended", architecture=arch),
    }


ARGS = ["--data", "digits-harmful", "--optimizer", "adam", "--lr", "1e-3,1e-2", "--steps", "60"]
ARGS += ["--batch-size", "64", "--threshold", "harmful_accuracy>=0.5", "--eval-every", "5"]


def test_attack_cli_table_and_resume(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["attack", str(checkpoints["plain"]), *ARGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps to harmful_accuracy>=0.5" in text and "best: lr=" in text
    assert "2 runs now, 0 resumed" in text
    assert main(["attack", str(checkpoints["plain"]), *ARGS, "--out", str(out)]) == 0
    assert "0 runs now, 2 resumed" in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_attack_cli_json_on_defended(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["attack", str(checkpoints["defended"]), *ARGS, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["lr"] for r in rows] == [1e-3, 1e-2]
    assert all(r["alpha"] == 1e4 and r["summary"]["censored"] for r in rows)
    assert all(r["summary"]["diverged_at"] is not None for r in rows)


def test_attack_cli_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attack", "mlp-digits", "--data", "digits", "--optimizer", "adamm"]) == 2
    assert "Did you mean: adam" in capsys.readouterr().err
    assert main(["attack", "mlp-digits", "--data", "digits", "--train", "some"]) == 2
    assert "train in" in capsys.readouterr().err


@pytest.fixture(scope="module")
def defended_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's mlp-digits defended as the issue says: α = 1e4, top_k = 8, every linear layer."""
    out = tmp_path_factory.mktemp("zoo") / "mlp-digits-defended"
    assert main(["defend", "mlp-digits", "-o", str(out), "--alpha", "1e4", "--top-k", "8"]) == 0
    return out


EDGE = ["--data", "digits-harmful", "--optimizer", "adam,sgd", "--stability-edge"]
EDGE += ["--batch-size", "32", "--edge-steps", "30"]


def test_stability_edge_cli_on_defended_digits(
    defended_zoo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["attack", str(defended_zoo), *EDGE, "--json"]) == 0
    edges = json.loads(capsys.readouterr().out)["stability_edge"]
    # the same 2/λ_max as `specdef curvature` on the same batch (same Lanczos start and budget)
    argv = ["curvature", str(defended_zoo), "--data", "digits-harmful", "--batch-size", "32"]
    assert main([*argv, "--no-bounds", "--json"]) == 0
    ceiling = json.loads(capsys.readouterr().out)["model"]["lr_ceiling"]
    for optimizer in ("adam", "sgd"):
        e = edges[optimizer]
        assert e["ceiling"] == pytest.approx(ceiling, rel=1e-3)
        assert e["ceiling"] == pytest.approx(2 / e["lambda_max"], rel=1e-12)
        assert e["edge"] < e["diverging"] <= e["edge"] * 10**0.05 * (1 + 1e-9)
        assert e["ratio_to_ceiling"] == pytest.approx(e["edge"] / e["ceiling"], rel=1e-12)
        probes = {p["lr"]: p["diverged_at"] for p in e["probes"]}
        assert probes[e["edge"]] is None and probes[e["diverging"]] is not None
        assert e["probes"][0]["lr"] == pytest.approx(e["ceiling"])  # bisection starts at 2/λ_max
    # Adam normalizes its steps, so its edge is far above GD's ceiling; SGD's is not
    assert edges["adam"]["edge"] > 100 * edges["sgd"]["edge"]
    assert main(["attack", str(defended_zoo), *EDGE]) == 0
    text = capsys.readouterr().out
    assert "adam: " in text and "sgd: " in text and "× 2/λ_max" in text


def test_resume_never_reuses_rows_of_other_weights_or_data(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["attack", str(checkpoints["plain"]), *ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    # the same run directory and options, but a copy of the model with one weight changed
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(checkpoints["plain"], other)
    weights = load_file(str(other / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first] + 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    from specdef.io.checkpoint import MANIFEST, bind_manifest

    manifest = json.loads((other / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps(bind_manifest(manifest, other)))
    assert main(["attack", str(other), *ARGS, "--out", str(out)]) == 0
    assert "2 runs now, 0 resumed" in capsys.readouterr().out
    other_data = [a if a != "digits-harmful" else "digits" for a in ARGS]
    assert main(["attack", str(checkpoints["plain"]), *other_data, "--out", str(out)]) == 0
    assert "2 runs now, 0 resumed" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len({r["run_id"] for r in rows}) == 6


def test_resume_never_reuses_rows_of_other_max_length_or_eval_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-length and --eval-limit change the tokenized data, so they change the run id: a
    rerun with other values runs anew instead of printing the old rows as resumed."""
    out = tmp_path / "run"
    base = ["attack", "llama-tiny-benign", "--data", "benign-qa", "--steps", "1", "--lr", "1e-3",
            "--eval-every", "1", "--batch-size", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    for extra, expected in (
        (["--max-length", "64", "--eval-limit", "2"], "1 runs now, 0 resumed"),
        (["--max-length", "64", "--eval-limit", "2"], "0 runs now, 1 resumed"),
        (["--max-length", "48", "--eval-limit", "2"], "1 runs now, 0 resumed"),
        (["--max-length", "64", "--eval-limit", "3"], "1 runs now, 0 resumed"),
    ):
        assert main([*base, *extra]) == 0
        assert expected in capsys.readouterr().out
